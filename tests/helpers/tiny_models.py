"""Small random decoders of several families for engine tests (4 layers, 4 query / 2 KV heads
of 64), saved with SmolLM2's tokenizer so prompts are real text."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

NUM_LAYERS, NUM_KV_HEADS = 4, 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def family_config(family: str):
    import transformers

    common = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=NUM_LAYERS,
                  num_attention_heads=4, num_key_value_heads=NUM_KV_HEADS, head_dim=64,
                  max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.25)
    configs = {
        "qwen2": lambda: transformers.Qwen2Config(**common, use_sliding_window=False,
                                                  architectures=["Qwen2ForCausalLM"]),
        "qwen3": lambda: transformers.Qwen3Config(**common, use_sliding_window=False,
                                                  architectures=["Qwen3ForCausalLM"]),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None,
                                                      architectures=["MistralForCausalLM"]),
        "gemma": lambda: transformers.GemmaConfig(**common, architectures=["GemmaForCausalLM"]),
        "phi3": lambda: transformers.Phi3Config(**common, architectures=["Phi3ForCausalLM"]),
        # Llama-3.1's RoPE scaling (theta and factors as in Llama-3.1-8B), with an original context
        # of 64 instead of 8192: every wavelength over 64 tokens (26 of the 32 frequencies) is
        # stretched 8x and 3 more partly, well within the 600-token prompt.
        "llama31": lambda: transformers.LlamaConfig(**common, rope_parameters=LLAMA31_ROPE,
                                                    architectures=["LlamaForCausalLM"]),
        # Qwen3-MoE: sparse MoE MLPs in layers 0, 2, 3 and a dense MLP in layer 1.
        "qwen3moe": lambda: transformers.Qwen3MoeConfig(
            **common, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[1], architectures=["Qwen3MoeForCausalLM"]),
    }
    return configs[family]()


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

def save_tiny_model(folder: Path, family: str, smollm2: str):
    """A random ``family`` decoder (seed 0) saved in ``folder`` with SmolLM2's tokenizer; its config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = family_config(family)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (source := Path(smollm2) / name).is_file():
            shutil.copy(source, Path(folder) / name)
    return config
