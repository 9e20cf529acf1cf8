"""The block-manager extension inside a real vLLM engine (CPU, SmolLM2-135M, fp32).

Stock and DUO get the same KV memory budget (256 MiB: small enough that a few 2K-token
requests fill stock's cache, so the tests stay fast on two cores). The engines run in-process
(``tests.helpers.llm.offline_llm``'s default) so the tests can read the scheduler's block pool and
per-group block tables. In-process engines share vLLM's process-wide parallel state, so only
one is alive at a time: each fixture runs its measurements and shuts its engine down.
"""

from __future__ import annotations

import random

import pytest

from duo_vllm.kv_cache.report import kv_report
from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.llm import offline_llm

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 8192
KV_BYTES = 256 * 1024 * 1024
# 1024-token prefill chunks: a max-length request then peaks at 64 retrieval + 12 streaming
# blocks, which the 256 MiB pool holds (DUO refuses at start-up a pool that cannot).
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, seed=0,
              kv_cache_memory_bytes=KV_BYTES, max_num_batched_tokens=1024)
SINK, RECENT = 64, 256
CONCURRENT = 3  # requests of LONG tokens: together more than stock's KV, less than DUO's
LONG = 2000
LENGTHS = (2048, 4000)  # prompts whose held blocks are watched: many windows long, one not block-aligned
NEW_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def kv_size_from_the_engine_args():
    with pytest.MonkeyPatch.context() as mp:
        # vLLM's CPU platform lets this legacy variable override kv_cache_memory_bytes.
        mp.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        yield


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    return random_pattern_dir(tmp_path_factory.mktemp("pattern"), num_layers=30, num_kv_heads=3, seed=5)


def duo_engine(smollm2, pattern, sparsity, sink=SINK, recent=RECENT, **kwargs):
    duo = {"pattern": pattern, "sparsity": sparsity, "sink": sink, "recent": recent}
    return offline_llm(smollm2, attention_backend="DUO", additional_config={"duo": duo},
                       **{**ENGINE, **kwargs})


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def kv_tokens(llm) -> int:
    return llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens


def capacity_report(llm):
    # The retrieval group's block size as planned (vLLM later rewrites cache_config's).
    block_size = scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers[0].block_size
    return kv_report(llm.llm_engine.vllm_config, context_len=MAX_MODEL_LEN, block_size=block_size)


def held_blocks(llm, request_id):
    """Physical blocks (null entries excluded) the request holds in each KV-cache group."""
    managers = scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers
    counts = []
    for manager in managers:
        blocks = next((b for rid, b in manager.req_to_blocks.items() if rid.startswith(request_id)), [])
        counts.append(sum(1 for b in blocks if not b.is_null))
    return counts


def run_together(llm, prompts, max_tokens=NEW_TOKENS, watch=None):
    """Submit every prompt at once and step the engine to the end.

    Returns the outputs, the most requests running in one step, the most preemptions seen, and
    (if ``watch`` names a prompt index) that request's held blocks per group after every step.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = scheduler_of(llm)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [f"req{random.getrandbits(40)}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    outputs, max_running, preemptions, held = {}, 0, 0, []
    for _ in range(100_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        max_running = max(max_running, len(scheduler.running))
        preemptions = max(preemptions, sum(r.num_preemptions for r in scheduler.running))
        if watch is not None:
            held.append(held_blocks(llm, ids[watch]))
    else:
        raise AssertionError("the requests never finished")
    return [outputs[rid] for rid in ids], max_running, preemptions, held


@pytest.fixture(scope="module")
def long_prompts(smollm2_tokenizer):
    from duo_vllm.testing.haystack import haystack_tokens

    return [haystack_tokens(smollm2_tokenizer, LONG, offset=1000 * i) for i in range(CONCURRENT)]


@pytest.fixture(scope="module")
def stock(smollm2, long_prompts):
    # 256 MiB hold under 8192 tokens of stock KV, which vLLM refuses for max_model_len 8192.
    with offline_llm(smollm2, **{**ENGINE, "max_model_len": 4096}) as llm:
        _, running, preempted, _ = run_together(llm, long_prompts)
        return {"tokens": kv_tokens(llm), "running": running, "preempted": preempted}


@pytest.fixture(scope="module")
def duo50(smollm2, pattern, smollm2_tokenizer, long_prompts):
    from duo_vllm.testing.haystack import haystack_tokens

    with duo_engine(smollm2, pattern, 0.5) as llm:
        result = {"tokens": kv_tokens(llm), "report": capacity_report(llm),
                  "retrieval_block": capacity_report(llm).block_size}
        for n in LENGTHS:
            prompt = haystack_tokens(smollm2_tokenizer, n, offset=n)
            result[f"held{n}"] = run_together(llm, [prompt], watch=0)[3]
        together, running, preempted, _ = run_together(llm, long_prompts)
        result.update(together=together, running=running, preempted=preempted)
        result["alone"] = [run_together(llm, [p])[0][0] for p in long_prompts]
        # a new prompt (a miss), then the same prompt again (a hit in both groups)
        fresh = {"prompt_token_ids": haystack_tokens(smollm2_tokenizer, 2500, offset=99_000)}
        first = llm.generate([fresh], _greedy(), use_tqdm=False)[0]
        again = llm.generate([fresh], _greedy(), use_tqdm=False)[0]
        result.update(first=list(first.outputs[0].token_ids), again=list(again.outputs[0].token_ids),
                      first_cached=first.num_cached_tokens, again_cached=again.num_cached_tokens)
    return result


def _greedy():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def test_capacity_matches_the_pattern_50(stock, duo50):
    """vLLM's own "KV cache size: N tokens" grows by the ratio the pattern implies (>= 0.95 of it)."""
    check_capacity(duo50["tokens"] / stock["tokens"], duo50["report"])


def test_capacity_matches_the_pattern_25(smollm2, pattern, stock):
    with duo_engine(smollm2, pattern, 0.75) as llm:
        tokens, report = kv_tokens(llm), capacity_report(llm)
    assert report.streaming_block_size < report.block_size  # the two groups differ in block size
    check_capacity(tokens / stock["tokens"], report)


def check_capacity(ratio, report):
    # The pattern's bound counts exactly sink + recent tokens per streaming head; vLLM's figure
    # rounds to blocks, so it may fall short by a few percent but no more.
    assert ratio >= 0.95 * report.theoretical_ratio, (ratio, report)
    assert ratio <= report.theoretical_ratio, (ratio, report)
    # (stock's pool loses up to one block to rounding: 2% at this small budget)
    assert abs(ratio - report.planned_ratio) < 0.02 * report.planned_ratio, (ratio, report)


def test_only_retrieval_blocks_grow_with_length(duo50):
    """During decode, a 2K and a 4K prompt hold retrieval blocks in proportion to their length
    and the same bounded number of streaming blocks: the sink block and the window's 2-3 blocks
    (3 or 4 in all, depending on where the window starts within a block)."""
    block = duo50["retrieval_block"]
    for n in LENGTHS:
        # after each decode step (the first entry is the end of the prefill step, which still
        # holds the chunk's streaming blocks until the next step frees the gap)
        decode = [held for held in duo50[f"held{n}"] if held[0] >= -(-n // block)][1:]
        assert len(decode) >= NEW_TOKENS - 2
        assert {r for r, _ in decode} <= set(range(-(-n // block), -(-(n + NEW_TOKENS) // block) + 1))
        assert {s for _, s in decode} <= {3, 4}, (n, decode)


def test_small_pool_is_refused_at_start_up(smollm2, pattern):
    """vLLM's own start-up check refuses the pool: the streaming spec reports its peak. 25 blocks
    (24 usable next to vLLM's null block) hold a 2100-token request between steps (17 retrieval +
    4 streaming blocks), but not at its peak with a 4096-token chunk in flight (17 + 17)."""
    with pytest.raises(Exception, match=r"To serve at least one request with the model's max seq len \(2100\)"):
        with duo_engine(smollm2, pattern, 0.5, num_gpu_blocks_override=25, max_model_len=2100,
                        max_num_batched_tokens=4096):
            pass


def test_stock_cannot_hold_what_duo_runs_concurrently(stock, duo50):
    assert CONCURRENT * (LONG + NEW_TOKENS) > stock["tokens"]
    assert stock["running"] < CONCURRENT or stock["preempted"] > 0, stock
    assert (duo50["running"], duo50["preempted"]) == (CONCURRENT, 0)
    assert duo50["together"] == duo50["alone"]


def test_prefix_cache_hit_equals_miss(duo50):
    assert duo50["first_cached"] == 0
    assert duo50["again_cached"] >= 2500 - 128  # all full blocks but the last prompt token's
    assert duo50["again"] == duo50["first"]


def test_preemption_and_recompute_give_the_same_tokens(smollm2, pattern, smollm2_tokenizer):
    """Two requests that fit at admission but outgrow the pool while decoding: DUO preempts one,
    recomputes it later, and both produce the tokens they produce alone."""
    from duo_vllm.testing.haystack import haystack_tokens

    prompts = [haystack_tokens(smollm2_tokenizer, 150, offset=3000 * i) for i in range(2)]
    # 32-token blocks: both fit after prefill (5 retrieval blocks each, plus streaming ones); each
    # ends holding 8 retrieval blocks: 20 blocks hold one such request, not both.
    with duo_engine(smollm2, pattern, 0.5, sink=16, recent=48, block_size=32, num_gpu_blocks_override=20,
                    max_model_len=256, max_num_batched_tokens=1024, enable_prefix_caching=False) as small:
        alone = [run_together(small, [p], max_tokens=90)[0][0] for p in prompts]
        together, _, preempted, _ = run_together(small, prompts, max_tokens=90)
    assert preempted > 0
    assert together == alone


def test_many_requests_with_aborts_leak_no_block(smollm2, pattern, smollm2_tokenizer):
    """120 requests of mixed lengths, some sharing a prefix, some aborted mid-flight, prefix
    caching on: the free block count returns to its start. A small block, sink and window make
    short prompts free gap blocks, so every manager path runs."""
    from vllm import SamplingParams

    from duo_vllm.testing.haystack import haystack_tokens

    with duo_engine(smollm2, pattern, 0.5, sink=16, recent=48, block_size=32, max_model_len=1024) as llm:
        engine = llm.llm_engine
        pool = scheduler_of(llm).kv_cache_manager.block_pool
        free_at_start = pool.get_num_free_blocks()
        rng = random.Random(0)
        shared = haystack_tokens(smollm2_tokenizer, 200, offset=777)
        pending = []
        for i in range(120):
            ids = haystack_tokens(smollm2_tokenizer, rng.choice([3, 20, 60, 150, 300]),
                                  offset=rng.randrange(50_000))
            if rng.random() < 0.3:
                ids = shared + ids
            pending.append((f"mix{i}", ids,
                            SamplingParams(max_tokens=rng.randint(1, 12), temperature=0, ignore_eos=True)))
        live: list[str] = []
        aborted = steps = 0
        while pending or engine.has_unfinished_requests():
            for _ in range(min(len(pending), rng.randint(0, 12))):
                rid, ids, params = pending.pop()
                engine.add_request(rid, {"prompt_token_ids": ids}, params)
                live.append(rid)
            for _ in range(rng.choice([0, 0, 1, 2])):
                if live:
                    engine.abort_request([live.pop(rng.randrange(len(live)))])
                    aborted += 1
            finished = {out.request_id for out in engine.step() if out.finished}
            live = [rid for rid in live if rid not in finished]
            steps += 1
            assert steps < 20_000
        free_at_end = pool.get_num_free_blocks()
    assert aborted > 12
    assert free_at_end == free_at_start


def _peak_blocks(kv_cache_config, max_len: int, in_flight: int) -> int:
    """Blocks one request of ``max_len`` tokens holds at its peak, over both groups."""
    from duo_vllm.kv_cache.spec import DuoStreamingSpec

    needed = 0
    for group in kv_cache_config.kv_cache_groups:
        spec = getattr(group.kv_cache_spec, "first_spec", group.kv_cache_spec)
        if isinstance(spec, DuoStreamingSpec):
            needed += spec.max_admission_blocks_per_request(in_flight, max_len)
        else:
            needed += -(-max_len // spec.block_size)
    return needed


def test_auto_fit_max_model_len_counts_the_streaming_peak(smollm2, pattern, smollm2_tokenizer):
    """``max_model_len=-1`` (vLLM's auto-fit) on a context extended with ``hf_overrides``: vLLM's
    own auto-fit, through the streaming spec's ``max_memory_usage_bytes``, picks the longest
    request whose peak (with a 4096-token prefill chunk of streaming blocks in flight) fits the
    pool less vLLM's null block. In this small pool that chunk costs a third of it, yet DUO still
    fits a longer request than stock's auto-fit gets from the same memory."""
    with duo_engine(smollm2, pattern, 0.5, max_model_len=-1, max_num_batched_tokens=4096,
                    hf_overrides={"max_position_embeddings": 65536}) as llm:
        vllm_config = llm.llm_engine.vllm_config
        fitted = vllm_config.model_config.max_model_len
        in_flight = vllm_config.max_in_flight_tokens
        config = scheduler_of(llm).kv_cache_config
        out = llm.generate([{"prompt_token_ids": list(range(1000, 1300))}], _greedy(), use_tqdm=False)[0]
    usable = config.num_blocks - 1  # the block pool keeps one null block
    assert _peak_blocks(config, fitted, in_flight) <= usable
    assert _peak_blocks(config, fitted + 1, in_flight) > usable  # the longest
    stock_tokens = KV_BYTES // (30 * 3 * 64 * 2 * 4)  # SmolLM2 fp32: 46,080 B per token
    assert 1.15 * stock_tokens < fitted < 65536, (fitted, stock_tokens)
    assert len(out.outputs[0].token_ids) == NEW_TOKENS
