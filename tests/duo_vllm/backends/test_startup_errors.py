"""Every bad DUO input stops start-up with one clear message, before an engine process starts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from duo_vllm.config import DuoConfigError
from duo_vllm.pattern import PatternError
from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.server import run_vllm_expect_failure


@pytest.fixture(scope="module")
def good_pattern(tmp_path_factory):
    return random_pattern_dir(tmp_path_factory.mktemp("good"), num_layers=30, num_kv_heads=3)


def _gates_file(folder, first_value):
    """A 30 x 3 pattern for SmolLM2 whose first gate is ``first_value`` (a JSON literal)."""
    folder.mkdir()
    gates = np.full((30, 3), 0.5).tolist()
    (folder / "duo_pattern.json").write_text(
        json.dumps({"format": "duo-vllm-pattern", "version": 1, "num_layers": 30, "num_kv_heads": 3,
                    "gates": gates}).replace("0.5", first_value, 1))
    return str(folder)


def _original_format(folder, rows):
    """The published DuoAttention output for SmolLM2: gates TSV (one row per layer) + config.json."""
    folder.mkdir()
    (folder / "full_attention_heads.tsv").write_text("\n".join(rows) + "\n")
    (folder / "config.json").write_text(json.dumps({"sink_size": 64, "recent_size": 256, "sparsity": 0.5}))
    return folder


def _bad_patterns(root):
    wrong_shape = random_pattern_dir(root / "wrong_shape", num_layers=32, num_kv_heads=8)
    other = SimpleNamespace(architectures=["LlamaForCausalLM"], num_hidden_layers=30, num_attention_heads=9,
                            num_key_value_heads=3, hidden_size=576, head_dim=64, vocab_size=32000,
                            rope_theta=10000.0, max_position_embeddings=2048)
    other_model = random_pattern_dir(root / "other_model", num_layers=30, num_kv_heads=3, hf_config=other,
                                     model_name="SomeOther-135M")
    whole = Path(random_pattern_dir(root / "whole", num_layers=30, num_kv_heads=3))
    good_text = (whole / "duo_pattern.json").read_text()
    truncated = root / "truncated"
    truncated.mkdir()
    (truncated / "duo_pattern.json").write_text(good_text[: len(good_text) // 2])  # e.g. a copy cut short
    not_json = root / "notes.json"
    not_json.write_text("layer\thead\tgate\n0\t0\t0.5\n")
    not_text = root / "binary"
    not_text.mkdir()
    (not_text / "duo_pattern.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    row = "\t".join(["0.5"] * 3)
    tsv_ragged = _original_format(root / "tsv_ragged", [row] * 7 + ["0.5\t0.5"] + [row] * 22)
    tsv_text = _original_format(root / "tsv_text", [row] * 4 + ["0.5\tabc\t0.5"] + [row] * 25)
    return {"wrong_shape": wrong_shape, "nan": _gates_file(root / "nan", "NaN"),
            "inf": _gates_file(root / "inf", "-Infinity"), "other_model": other_model,
            "missing": str(root / "does-not-exist"), "truncated": str(truncated), "not_json": str(not_json),
            "not_text": str(not_text), "tsv_ragged": str(tsv_ragged / "full_attention_heads.tsv"),
            "tsv_text": str(tsv_text)}


# case: (DUO options, what the one-line message must say: the problem and how to fix it, where the
# message says more than the valid range). "@name" is a path from _bad_patterns. Every case is
# refused with PatternError (a pattern) or DuoConfigError (an option) as ERROR_TYPES says; LLM_ARGS are the case's other
# arguments to LLM(...).
CASES = {
    "wrong_shape": ({"pattern": "@wrong_shape"}, ("32 layers x 8 KV heads", "python -m gate_training")),
    "nan_gates": ({"pattern": "@nan"}, ("non-finite value (nan)", "retrain the gates or fix the pattern file")),
    "inf_gates": ({"pattern": "@inf"}, ("non-finite value (-inf) at layer 0, KV head 0",
                                        "retrain the gates or fix the pattern file")),
    "truncated_pattern_file": ({"pattern": "@truncated"}, ("duo_pattern.json is not valid JSON (line",
                                                           "fix or regenerate the file")),
    "not_json_pattern_file": ({"pattern": "@not_json"}, ("notes.json is not valid JSON (line 1, column 1",
                                                         "fix or regenerate the file")),
    "not_text_pattern_file": ({"pattern": "@not_text"}, ("is not UTF-8 text",
                                                         "point to a duo_pattern.json or full_attention_heads.tsv")),
    "tsv_ragged_row": ({"pattern": "@tsv_ragged"}, ("full_attention_heads.tsv, line 8: 2 values but line 1 has 3",
                                                    "every layer row needs one value per KV head")),
    "tsv_non_number": ({"pattern": "@tsv_text"}, ("full_attention_heads.tsv, line 5, column 2: 'abc' is not a",
                                                  "fix or regenerate it")),
    "other_model": ({"pattern": "@other_model"}, ("fingerprint", "same shape, different model",
                                                  "python -m gate_training")),
    "missing_pattern": ({"pattern": "@missing"}, ("does-not-exist", "expected a directory holding duo_pattern.json")),
    "sparsity_above_1": ({"pattern": "@good", "sparsity": 1.5}, '"sparsity" must be a number in [0, 1]'),
    "sparsity_below_0": ({"pattern": "@good", "sparsity": -0.1}, '"sparsity" must be a number in [0, 1]'),
    "sink_zero": ({"pattern": "@good", "sink": 0}, ('"sink" must be a positive integer', "default: sink 64")),
    "recent_negative": ({"pattern": "@good", "recent": -5}, ('"recent" must be a positive integer', "recent 256")),
    "unknown_option": ({"pattern": "@good", "sprsity": 0.5}, ("Unknown DUO option(s) ['sprsity']",
                                                              "valid options: ['kernel', 'min_retrieval_per_layer'")),
    "exclusive_options": ({"pattern": "@good", "sparsity": 0.5, "threshold": 0.3},
                          ("DUO options ['sparsity', 'threshold'] are exclusive", "give only one of them")),
    "switch_not_bool": ({"pattern": "@good", "reorder_heads": "false"},
                        ('"reorder_heads" must be true or false', "got 'false'")),
    "kernel_unknown": ({"pattern": "@good", "kernel": "fa3"},
                       ('"kernel" must be one of', "'flash_attn', 'flashinfer'", "got 'fa3'")),
    "no_pattern_for_model": ({}, "python -m gate_training"),
    # A KV-cache dtype vLLM accepts but DUO cannot serve: refused by duo_vllm.kv_quant as a plain
    # ValueError (engine_config_validation), naming the dtypes that work.
    "kv_cache_dtype_unsupported": ({"pattern": "@good"},
                                   ("--kv-cache-dtype fp8_inc is not supported with --attention-backend DUO",
                                    "Use one of: auto")),
}
LLM_ARGS = {"kv_cache_dtype_unsupported": {"kv_cache_dtype": "fp8_inc"}}
ERROR_TYPES = {"kv_cache_dtype_unsupported": ValueError,
               **dict.fromkeys(["sparsity_above_1", "sparsity_below_0", "sink_zero", "recent_negative",
                                "unknown_option", "exclusive_options", "switch_not_bool", "kernel_unknown"],
                              DuoConfigError)}


@pytest.mark.parametrize("case", CASES)
def test_offline_llm_refuses_bad_input(smollm2, tmp_path, good_pattern, case, monkeypatch):
    from vllm import LLM

    paths = {**_bad_patterns(tmp_path), "good": good_pattern}
    options, expected = CASES[case]
    options = {k: paths[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in options.items()}
    if case == "no_pattern_for_model":
        monkeypatch.setenv("DUO_VLLM_PATTERNS", str(tmp_path / "none"))
        monkeypatch.setattr("duo_vllm.shipped_patterns.pattern_dirs", lambda: [])
    with pytest.raises(ValueError) as info:
        LLM(model=smollm2, enforce_eager=True, max_model_len=1024, attention_backend="DUO",
            additional_config={"duo": options}, **LLM_ARGS.get(case, {}))
    message = str(info.value)
    assert type(info.value) is ERROR_TYPES.get(case, PatternError), f"{type(info.value).__name__}: {message}"
    for part in (expected,) if isinstance(expected, str) else expected:
        assert part in message, message
    assert "\n" not in message.strip(), "one message, one line"


@pytest.mark.slow
def test_serve_refuses_bad_sparsity(smollm2, good_pattern):
    duo = json.dumps({"duo": {"pattern": good_pattern, "sparsity": 2}})
    code, log = run_vllm_expect_failure(smollm2, "--attention-backend", "DUO", "--additional-config", duo,
                                        "--enforce-eager", "--max-model-len", "1024", timeout=120)
    assert code != 0
    assert '"sparsity" must be a number in [0, 1]' in log, log[-2000:]
    assert "Engine core initialization failed" not in log, "the error should come before any engine starts"


@pytest.mark.slow
def test_serve_refuses_truncated_pattern_file(smollm2, tmp_path):
    truncated = _bad_patterns(tmp_path)["truncated"]
    duo = json.dumps({"duo": {"pattern": truncated}})
    code, log = run_vllm_expect_failure(smollm2, "--attention-backend", "DUO", "--additional-config", duo,
                                        "--enforce-eager", "--max-model-len", "1024", timeout=120)
    assert code != 0
    lines = [line for line in log.splitlines() if "duo_pattern.json is not valid JSON (line" in line]
    assert lines, log[-2000:]
    assert "fix or regenerate the file" in lines[-1], "the message and its fix on one line: " + lines[-1]
    assert "Engine core initialization failed" not in log, "the error should come before any engine starts"


def test_weight_cache_needs_the_checkpoint_head_order(smollm2, good_pattern):
    """Weights post-processed by vLLM's preload daemon may or may not have had their heads
    reordered there: DUO asks for reorder_heads false on both sides instead of guessing."""
    from vllm import LLM

    with pytest.raises(DuoConfigError, match='reorder_heads": false') as info:
        LLM(model=smollm2, enforce_eager=True, max_model_len=1024, attention_backend="DUO",
            load_format="ipc_cache", additional_config={"duo": {"pattern": good_pattern}})
    assert "\n" not in str(info.value).strip()


def test_pipeline_parallelism_is_refused_before_any_engine_starts(smollm2, good_pattern):
    """vLLM's CPU build cannot run pipeline parallelism even for stock attention (its later stages
    fail at the first step): on CPU DUO refuses it up front, naming tensor parallelism instead.
    On CUDA each stage plans its own layers (tests/duo_vllm/kv_cache/test_pipeline_stages.py)."""
    from vllm import LLM

    with pytest.raises(DuoConfigError, match="--tensor-parallel-size") as info:
        LLM(model=smollm2, enforce_eager=True, max_model_len=1024, attention_backend="DUO",
            pipeline_parallel_size=2, distributed_executor_backend="mp",
            additional_config={"duo": {"pattern": good_pattern}})
    assert "CPU build cannot run pipeline parallelism" in str(info.value) and "\n" not in str(info.value).strip()


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_backend_declares_what_vllm_validates_in_duos_words(platform):
    """Sinks, sliding windows and other attention types are declared unsupported on the backend
    class, so vLLM's validate_configuration (run on CUDA before any layer is built) refuses them,
    each reason in DUO's words. Class-level: no engine."""
    import importlib

    import torch
    from vllm.platforms.interface import DeviceCapability

    backend = importlib.import_module(f"duo_vllm.backends.{platform}").DuoAttentionBackend
    assert not backend.supports_sink() and not backend.supports_sliding_window()
    assert not backend.supports_attn_type("encoder_only") and backend.supports_attn_type("decoder")
    reasons = backend.validate_configuration(
        head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None, use_mla=False, has_sink=True,
        use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
        device_capability=DeviceCapability(9, 0), attn_type="encoder_only", has_sliding_window=True)
    for generic in ("attention sinks not supported", "sliding window not supported",
                    "attention type encoder_only not supported"):
        assert generic not in reasons, reasons
    text = " | ".join(reasons)
    for duo in ("learned attention sinks are not supported by DUO",
                "sliding-window attention layers are not supported by DUO",
                "DUO serves decoder self-attention only, not attention type encoder_only"):
        assert duo in text, text
    assert "serve it without --attention-backend DUO" in text


@pytest.mark.parametrize(("setting", "named"), [
    ({"sinks": [0.0, 0.0, 0.0]}, "learned attention sinks"),  # only whether the layer has them counts
    ({"sliding_window": 128}, "a sliding window"),
    ({"attn_type": "encoder_only"}, "attention type encoder_only"),
    ({"alibi_slopes": [0.5]}, "ALiBi slopes"),
    ({"logits_soft_cap": 30.0}, "logit soft-capping"),
])
def test_impl_refuses_what_vllm_never_validates_on_cpu(setting, named, monkeypatch):
    """vLLM's CPU platform never runs validate_configuration for a selected backend, and vLLM's
    selector never sees ALiBi or soft-capping on any platform: the Impl-time check names each
    (and passes the same layer without it). No engine."""
    from vllm.v1.attention.backend import AttentionType

    from duo_vllm.backends import common

    monkeypatch.setattr(common, "get_current_vllm_config",
                        lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=None)))
    args = {"alibi_slopes": None, "sliding_window": None, "sinks": None, "logits_soft_cap": None,
            "attn_type": AttentionType.DECODER, "kv_cache_dtype": "auto"} | setting
    with pytest.raises(ValueError, match=f"does not support {named};"):
        common.check_supported(**args)
    common.check_supported(**(args | {k: None for k in setting} | {"attn_type": AttentionType.DECODER}))
