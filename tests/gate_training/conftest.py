"""Fixtures for the gate-training tests: tiny random decoders of the supported families.

The tiny models use SmolLM2's tokenizer (vocabulary 49152) so that the whole trainer, data
builder included, runs on them in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_config(family: str, **overrides):
    """A 2-layer, 64-wide config of ``family`` ('llama', 'qwen2', 'mistral') with GQA 4:2."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    if family == "llama":
        cfg = LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    elif family == "qwen2":
        cfg = Qwen2Config(**common, use_sliding_window=False, architectures=["Qwen2ForCausalLM"])
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None, architectures=["MistralForCausalLM"])
    else:  # pragma: no cover
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    return model.eval()


def save_tiny_model(folder: Path, family: str, tokenizer_source: str, **overrides) -> Path:
    """Write a tiny random ``family`` model plus SmolLM2's tokenizer files into ``folder``."""
    model = tiny_model(family, **overrides)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_source) / name
        if src.is_file():
            shutil.copy(src, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, smollm2) -> dict[str, str]:
    """Folders of tiny random Llama / Qwen2 / Mistral models (saved once per session)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        family: str(save_tiny_model(root / family, family, smollm2))
        for family in ("llama", "qwen2", "mistral")
    }


@pytest.fixture(autouse=True)
def _few_threads():
    """The CI box has 2 cores shared with other suites: keep torch modest and restore afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)
