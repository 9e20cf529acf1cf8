"""DUO's paged layout at other KV block sizes (``--block-size``) gives the same model outputs.

Sink and window (16 / 64) are not multiples of these block sizes, so the streaming heads' sink
and window blocks are partly filled and the window's start falls inside a block; the retrieval
heads' pages hold 32 to 256 tokens. Every block size must give the plain-torch reference's
prompt log-probs and the same greedy tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.duo_vllm.backends.test_cpu_vs_reference import (
    LOGPROB_ATOL,
    NEW_TOKENS,
    RECENT,
    SINK,
    SPARSITY,
    duo_prompt_logprobs,
    reference_run,
)
from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.llm import greedy_tokens, offline_llm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(smollm2, smollm2_tokenizer, tmp_path_factory):
    from duo_vllm.testing.haystack import haystack_tokens

    pattern = random_pattern_dir(tmp_path_factory.mktemp("pattern"), num_layers=30, num_kv_heads=3, seed=5)
    prompts = [haystack_tokens(smollm2_tokenizer, 900, offset=100), haystack_tokens(smollm2_tokenizer, 333, offset=9000)]
    return pattern, prompts, reference_run(smollm2, pattern, prompts, SPARSITY, full_control=False)


@pytest.mark.parametrize("block_size", [32, 64, 256])
def test_block_size_gives_the_reference_outputs(smollm2, setup, block_size):
    pattern, prompts, reference = setup
    duo = {"duo": {"pattern": pattern, "sparsity": SPARSITY, "sink": SINK, "recent": RECENT}}
    with offline_llm(smollm2, attention_backend="DUO", additional_config=duo, block_size=block_size,
                     dtype="float32", enforce_eager=True, max_model_len=2048, seed=0) as llm:
        assert llm.llm_engine.vllm_config.cache_config.block_size == block_size
        logprobs = duo_prompt_logprobs(llm, prompts)
        tokens = greedy_tokens(llm, prompts, NEW_TOKENS)
    for i, (got, want) in enumerate(zip(logprobs, reference["logprobs"])):
        err = np.abs(got - want)
        assert err.max() < LOGPROB_ATOL, f"block size {block_size}, prompt {i}: max log-prob error {err.max():.2e}"
    assert tokens == reference["greedy"], f"block size {block_size}: greedy tokens differ from the reference"
