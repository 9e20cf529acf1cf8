"""Tests of duo_vllm.fingerprint: model identity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from duo_vllm.fingerprint import model_fingerprint

# ---------------------------------------------------------------- fingerprint

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "head_dim": 128,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 1048576,
    "torch_dtype": "bfloat16",
}


def test_fingerprint_format_and_dict_object_equivalence():
    fp = model_fingerprint(LLAMA)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(SimpleNamespace(**LLAMA)) == fp


def test_fingerprint_ignores_non_shape_fields_and_normalises():
    assert model_fingerprint({**LLAMA, "torch_dtype": "float16", "eos_token_id": 3}) == (
        model_fingerprint(LLAMA)
    )
    assert model_fingerprint({**LLAMA, "rope_theta": 500000}) == model_fingerprint(LLAMA)
    assert model_fingerprint({**LLAMA, "architectures": ["B", "A"]}) == model_fingerprint(
        {**LLAMA, "architectures": ["A", "B"]}
    )


def test_fingerprint_defaults_and_rope_locations():
    explicit = dict(LLAMA)
    implicit = {k: v for k, v in LLAMA.items() if k != "head_dim"}
    assert model_fingerprint(implicit) == model_fingerprint(explicit)
    mha = {**LLAMA, "num_key_value_heads": 32}
    assert model_fingerprint({k: v for k, v in mha.items() if k != "num_key_value_heads"}) == (
        model_fingerprint(mha)
    )
    no_top = {k: v for k, v in LLAMA.items() if k != "rope_theta"}
    nested = {**no_top, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    scaling = {**no_top, "rope_scaling": {"rope_type": "llama3", "rope_theta": 500000.0}}
    assert model_fingerprint(nested) == model_fingerprint(LLAMA)
    assert model_fingerprint(scaling) == model_fingerprint(LLAMA)
    assert model_fingerprint(no_top) != model_fingerprint(LLAMA)


@pytest.mark.parametrize(
    "change",
    [
        {"num_hidden_layers": 31},
        {"num_key_value_heads": 4},
        {"rope_theta": 10000.0},
        {"vocab_size": 32000},
        {"architectures": ["MistralForCausalLM"]},
        {"max_position_embeddings": 8192},
    ],
)
def test_fingerprint_changes_with_shape_fields(change):
    assert model_fingerprint({**LLAMA, **change}) != model_fingerprint(LLAMA)


def test_fingerprint_never_crashes():
    class Weird:
        @property
        def hidden_size(self):
            raise RuntimeError("boom")

    for cfg in ({}, object(), Weird(), {"architectures": 5, "num_attention_heads": 0,
                                        "hidden_size": 10, "rope_scaling": "x"}):
        assert len(model_fingerprint(cfg)) == 16


