"""The block-manager extension inside a real vLLM engine (CPU, SmolLM2-135M, 1 GiB of KV).

The engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the tests can read the
scheduler's block pool and per-group block tables directly.
"""

from __future__ import annotations

import random

import pytest

from duo_vllm.kv_cache.report import kv_report
from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.llm import greedy_tokens, offline_llm

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 8192
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, seed=0)
SINK, RECENT = 64, 256


@pytest.fixture(scope="module", autouse=True)
def in_process_engine_core():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    return random_pattern_dir(tmp_path_factory.mktemp("pattern"), num_layers=30, num_kv_heads=3, seed=5)


def duo_engine(smollm2, pattern, sparsity, **kwargs):
    duo = {"pattern": pattern, "sparsity": sparsity, "sink": SINK, "recent": RECENT}
    return offline_llm(smollm2, attention_backend="DUO", additional_config={"duo": duo},
                       **{**ENGINE, **kwargs})


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def kv_tokens(llm) -> int:
    return llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens


@pytest.fixture(scope="module")
def stock_capacity(smollm2):
    with offline_llm(smollm2, **ENGINE) as llm:
        return kv_tokens(llm)


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_capacity_matches_the_pattern(smollm2, pattern, stock_capacity, sparsity):
    """vLLM's own "KV cache size: N tokens" grows by the ratio the pattern implies (>= 0.95 of it)."""
    with duo_engine(smollm2, pattern, sparsity) as llm:
        tokens = kv_tokens(llm)
        report = kv_report(llm.llm_engine.vllm_config, context_len=MAX_MODEL_LEN)
    ratio = tokens / stock_capacity
    assert ratio >= 0.95 * report.theoretical_ratio, (ratio, report)
    flat = 1 / (1 - sparsity)  # bytes ratio with no streaming storage at all
    assert ratio >= 0.9 * flat, (ratio, flat)
    assert ratio <= flat


@pytest.fixture(scope="module")
def duo50(smollm2, pattern):
    with duo_engine(smollm2, pattern, 0.5) as llm:
        yield llm


def held_blocks(llm, request_id):
    """Physical blocks (null entries excluded) the request holds in each KV-cache group."""
    managers = scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers
    counts = []
    for manager in managers:
        blocks = next((b for rid, b in manager.req_to_blocks.items() if rid.startswith(request_id)), [])
        counts.append(sum(1 for b in blocks if not b.is_null))
    return counts


def test_only_retrieval_blocks_grow_with_length(duo50, smollm2_tokenizer):
    """Mid-request, a 4K and an 8K prompt hold retrieval blocks in proportion to their length and
    the same number of streaming blocks."""
    from vllm import SamplingParams

    from duo_vllm.testing.haystack import haystack_tokens

    engine = duo50.llm_engine
    held = {}
    for n in (4096, 8000):
        rid = f"len{n}"
        engine.add_request(rid, {"prompt_token_ids": haystack_tokens(smollm2_tokenizer, n, offset=n)},
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        seen = []
        while engine.has_unfinished_requests():
            engine.step()
            seen.append(held_blocks(duo50, rid))
        held[n] = seen[-2]  # after the last decode step that still held the request
    retrieval_block = duo50.llm_engine.vllm_config.cache_config.block_size
    (r4, s4), (r8, s8) = held[4096], held[8000]
    assert r4 == -(-(4096 + 7) // retrieval_block) and r8 == -(-(8000 + 7) // retrieval_block)
    assert s4 == s8, held
    assert s4 <= 4, held


def test_prefix_cache_hit_equals_miss(duo50, smollm2_tokenizer):
    """The same long prompt twice: the second run hits the prefix cache in both groups (fewer
    computed tokens) and generates the same tokens."""
    from duo_vllm.testing.haystack import haystack_tokens

    prompt = haystack_tokens(smollm2_tokenizer, 3000, offset=123)
    first = greedy_tokens(duo50, [prompt], 16)
    scheduler = scheduler_of(duo50)
    hits_before = scheduler.kv_cache_manager.prefix_cache_stats.hits if scheduler.kv_cache_manager.prefix_cache_stats else None
    second = greedy_tokens(duo50, [prompt], 16)
    assert first == second
    if hits_before is not None:
        assert scheduler.kv_cache_manager.prefix_cache_stats.hits > hits_before


def test_many_requests_with_aborts_leak_no_block(duo50, smollm2_tokenizer):
    """500 requests of mixed lengths, a fifth aborted mid-flight: the free block count returns."""
    from vllm import SamplingParams

    from duo_vllm.testing.haystack import haystack_tokens

    engine = duo50.llm_engine
    pool = scheduler_of(duo50).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    rng = random.Random(0)
    pending = []
    for i in range(500):
        n = rng.choice([5, 40, 130, 300, 700, 1500])
        pending.append((f"mix{i}", haystack_tokens(smollm2_tokenizer, n, offset=rng.randrange(50_000)),
                        SamplingParams(max_tokens=rng.randint(1, 12), temperature=0, ignore_eos=True)))
    live: list[str] = []
    steps = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(min(len(pending), rng.randint(0, 12))):
            rid, ids, params = pending.pop()
            engine.add_request(rid, {"prompt_token_ids": ids}, params)
            live.append(rid)
        if live and rng.random() < 0.2:
            engine.abort_request([live.pop(rng.randrange(len(live)))])
        engine.step()
        steps += 1
        assert steps < 20_000
    assert pool.get_num_free_blocks() == free_at_start
