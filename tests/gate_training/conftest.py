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
TINY_FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "qwen3moe", "llama31")


def tiny_config(family: str, **overrides):
    """A 2-layer, 64-wide config of ``family`` with GQA 4:2 (heads of 16).

    Families: 'llama', 'qwen2', 'mistral'; 'qwen3' (per-head q/k RMSNorm); 'qwen3moe' (q/k norms and
    a sparse-MoE MLP, 4 experts top-2, in layer 0; layer 1 dense); 'llama31' (Llama-3.1's "llama3"
    RoPE scaling with an original context of 64, so the rescaled frequencies act on the samples).
    """
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

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
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=16, use_sliding_window=False, architectures=["Qwen3ForCausalLM"])
    elif family == "qwen3moe":
        cfg = Qwen3MoeConfig(**common, head_dim=16, moe_intermediate_size=32, num_experts=4,
                             num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                             mlp_only_layers=[1], architectures=["Qwen3MoeForCausalLM"])
    elif family == "llama31":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = LlamaConfig(**common, rope_parameters=rope, architectures=["LlamaForCausalLM"])
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
    """Folders of tiny random models of every ``tiny_config`` family (saved once per session)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        family: str(save_tiny_model(root / family, family, smollm2))
        for family in TINY_FAMILIES
    }


@pytest.fixture(autouse=True)
def _few_threads():
    """The CI box has 2 cores shared with other suites: keep torch modest and restore afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)
