"""DuoStreamingManager on vLLM's real BlockPool: what a request holds, what it frees, what a
prefix-cache hit returns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

from duo_vllm.kv_cache.manager import DuoStreamingManager, gap_blocks
from duo_vllm.kv_cache.spec import DuoStreamingSpec

NUM_BLOCKS = 400


def make_manager(block_size: int, sink: int, recent: int, caching: bool = False):
    spec = DuoStreamingSpec(block_size=block_size, num_kv_heads=2, head_size=8, dtype=torch.float32,
                            sink=sink, recent=recent)
    pool = BlockPool(NUM_BLOCKS, enable_caching=caching, hash_block_size=block_size)
    manager = DuoStreamingManager(spec, block_pool=pool, enable_caching=caching, kv_cache_group_id=0,
                                  scheduler_block_size=block_size)
    return spec, pool, manager


def needed_blocks(sink: int, recent: int, block_size: int, computed: int) -> set[int]:
    """Blocks a query at position ``computed`` or later can read: the reference for the manager."""
    readable = set(range(min(sink, computed))) | set(range(max(0, computed - recent + 1), computed))
    return {p // block_size for p in readable}


@settings(max_examples=80, deadline=None)
@given(
    block_size=st.sampled_from([16, 32, 128]),
    sink=st.integers(1, 200),
    recent=st.integers(1, 600),
    chunks=st.lists(st.integers(1, 700), min_size=1, max_size=25),
)
def test_request_holds_only_sink_and_window_blocks(block_size, sink, recent, chunks):
    """Run one request through prefill chunks and decode steps as the scheduler does: free what is
    skipped, allocate the step's tokens. Between steps the request holds exactly the blocks its
    future queries can read, never a block they need is freed, and finishing frees everything."""
    _, pool, manager = make_manager(block_size, sink, recent)
    free_at_start = pool.get_num_free_blocks()
    computed = 0
    for step in chunks:
        step = min(step, (NUM_BLOCKS - 40) * block_size // 4)
        manager.remove_skipped_blocks("r", computed)
        manager.allocate_new_blocks("r", computed + step, computed + step)
        computed += step
        manager.remove_skipped_blocks("r", computed)
        blocks = manager.req_to_blocks["r"]
        held = {i for i, b in enumerate(blocks) if not b.is_null}
        need = needed_blocks(sink, recent, block_size, computed)
        assert need <= held, f"freed blocks {sorted(need - held)} that later queries read"
        first, last = gap_blocks(sink, recent, block_size, computed)
        assert held == set(range(len(blocks))) - set(range(first, last))
        bound = cdiv(sink, block_size) + cdiv(recent - 1, block_size) + 1
        assert len(held) <= bound, f"holds {len(held)} blocks, bound {bound}"
        assert manager.num_held_blocks("r") == len(held)
        assert pool.get_num_free_blocks() == free_at_start - len(held)
    manager.free("r")
    assert pool.get_num_free_blocks() == free_at_start


def test_streaming_footprint_is_constant_in_length():
    """Between 4K and 8K tokens of decode the held block count does not change."""
    _, _, manager = make_manager(128, 64, 256)
    manager.allocate_new_blocks("r", 4096, 4096)
    manager.remove_skipped_blocks("r", 4096)
    held = []
    for computed in range(4096, 8193, 64):
        manager.remove_skipped_blocks("r", computed)
        manager.allocate_new_blocks("r", computed + 1, computed + 1)
        held.append(manager.num_held_blocks("r"))
    assert max(held) <= 1 + 3 + 1 and min(held) >= 1 + 2, held


def test_spec_counts_sink_window_and_slack():
    spec = DuoStreamingSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.float32,
                            sink=64, recent=256)
    assert spec.sink_blocks() == 1
    assert spec.max_blocks_per_request(max_model_len=8192) == 1 + 2 + 1
    assert spec.max_blocks_per_request(max_model_len=200) == 2  # never more than the whole request
    assert spec.page_size_bytes == 3 * 128 * 2 * 64 * 4


def test_pool_is_sized_for_the_peak_and_reported_between_steps():
    """vLLM sizes the pool (and auto-fits max_model_len) from ``max_memory_usage_bytes``: the
    in-step peak, sink + window + one step of tokens. Its capacity figure is evaluated under
    ``between_steps_footprint``: sink + window."""
    from types import SimpleNamespace

    from duo_vllm.kv_cache.spec import between_steps_footprint

    spec = DuoStreamingSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32,
                            sink=16, recent=64)
    config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=100_000), max_in_flight_tokens=2048)
    assert spec.max_memory_usage_bytes(config) == (1 + cdiv(63 + 2048, 16) + 1) * spec.page_size_bytes
    with between_steps_footprint():
        assert spec.max_memory_usage_bytes(config) == (1 + cdiv(63, 16) + 1) * spec.page_size_bytes
    assert spec.max_memory_usage_bytes(config) == (1 + cdiv(63 + 2048, 16) + 1) * spec.page_size_bytes
    short = SimpleNamespace(model_config=SimpleNamespace(max_model_len=40), max_in_flight_tokens=2048)
    assert spec.max_memory_usage_bytes(short) == cdiv(40, 16) * spec.page_size_bytes  # never past the request


def _hashes(n: int, seed: int = 0):
    return [bytes([seed, i % 256, i // 256]) * 4 for i in range(n)]


@pytest.mark.parametrize("evict_gap", [False, True])
def test_prefix_hit_needs_only_sink_and_window_blocks(evict_gap):
    """A cached prefix whose gap blocks were freed (and even evicted) still hits, with null blocks
    in the gap; a missing window block shortens the hit."""
    block_size, sink, recent = 16, 16, 40
    spec, pool, manager = make_manager(block_size, sink, recent, caching=True)
    n_blocks = 20
    hashes = _hashes(n_blocks)
    manager.allocate_new_blocks("a", n_blocks * block_size, n_blocks * block_size)
    blocks = list(manager.req_to_blocks["a"])
    for i, block in enumerate(blocks):  # what BlockPool.cache_full_blocks records for a full block
        key = make_block_hash_with_group_id(hashes[i], 0)
        block.set_block_hash(key, block_size)
        pool.cached_block_hash_to_block.insert(key, block)
    manager.free("a")
    if evict_gap:
        first, last = gap_blocks(sink, recent, block_size, n_blocks * block_size)
        for i in range(first, last):
            pool._maybe_evict_cached_block(blocks[i])
    hit, length = DuoStreamingManager.find_longest_cache_hit(
        hashes, n_blocks * block_size, [0], pool, spec, False, block_size)
    assert length == n_blocks * block_size
    first, last = gap_blocks(sink, recent, block_size, length)
    for i, block in enumerate(hit[0]):
        if first <= i < last:
            assert block.is_null
        else:
            assert block is blocks[i]
    # lose one window block: the hit must end before it
    pool._maybe_evict_cached_block(blocks[n_blocks - 2])
    hit, length = DuoStreamingManager.find_longest_cache_hit(
        hashes, n_blocks * block_size, [0], pool, spec, False, block_size)
    assert length <= (n_blocks - 2) * block_size
    f2, l2 = gap_blocks(sink, recent, block_size, length)
    assert all(not hit[0][i].is_null for i in range(len(hit[0])) if not f2 <= i < l2)


def test_admission_counts_what_a_request_holds_at_once():
    """vLLM admits a new request only if its blocks fit; for the streaming group that is the sink,
    window and one step of tokens, not the whole prompt (a long prompt would wait forever)."""
    spec = DuoStreamingSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32,
                            sink=16, recent=64, step_tokens=256)
    pool = BlockPool(NUM_BLOCKS, enable_caching=False, hash_block_size=16)
    manager = DuoStreamingManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                                  scheduler_block_size=16)
    whole = 16 * 300  # a prompt far longer than the pool
    admitted = manager.get_num_blocks_to_allocate("r", whole, [], 0, 0, whole, apply_admission_cap=True)
    assert admitted == spec.max_blocks_in_step() == 1 + cdiv(63 + 256, 16) + 1
    # the figure vLLM sizes the pool with at start-up is the same peak
    assert spec.max_admission_blocks_per_request(256, whole) == admitted
    assert manager.get_num_blocks_to_allocate("r", 256, [], 0, 0, 256) == 16


@settings(max_examples=150, deadline=None)
@given(sink=st.integers(1, 70), recent=st.integers(1, 120), n_blocks=st.integers(1, 30),
       cached=st.data(), align=st.sampled_from([1, 2, 4]))
def test_cache_hit_is_the_longest_readable_prefix(sink, recent, n_blocks, cached, align):
    """Against brute force: the hit is the longest aligned prefix whose sink and window blocks
    (what the next query reads) are all cached; gap entries are null blocks."""
    block_size = 16
    spec, pool, manager = make_manager(block_size, sink, recent, caching=True)
    hashes = _hashes(n_blocks, seed=3)
    manager.allocate_new_blocks("a", n_blocks * block_size, n_blocks * block_size)
    blocks = list(manager.req_to_blocks["a"])
    present = cached.draw(st.lists(st.booleans(), min_size=n_blocks, max_size=n_blocks))
    for i, block in enumerate(blocks):
        if present[i]:
            key = make_block_hash_with_group_id(hashes[i], 0)
            block.set_block_hash(key, block_size)
            pool.cached_block_hash_to_block.insert(key, block)
    manager.free("a")

    def readable(n):
        first, last = gap_blocks(sink, recent, block_size, n * block_size)
        return all(present[i] for i in [*range(min(first, n)), *range(max(first, last), n)])

    expected = max((n for n in range(n_blocks + 1) if n % align == 0 and (n == 0 or readable(n))), default=0)
    hit, length = DuoStreamingManager.find_longest_cache_hit(
        hashes, n_blocks * block_size, [0], pool, spec, False, align * block_size)
    assert length == expected * block_size
    first, last = gap_blocks(sink, recent, block_size, length)
    for i, block in enumerate(hit[0]):
        assert block.is_null == (first <= i < last)
