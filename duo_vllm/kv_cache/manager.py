"""Block management for the streaming group: keep sink blocks and the recent window, free the rest.

Allocation is full attention's (a request's block table grows one entry per block of tokens),
so chunked prefill, preemption and abort need nothing new; after every step the blocks that lie
wholly between the sink blocks and the window are returned to the pool and their table entries
point to vLLM's null block (the DUO kernels never read them). Blocks are hashed and cached as
full-attention blocks are, and a prefix-cache hit needs only what a streaming query reads: the
sink blocks and the blocks of the last ``recent`` tokens before the hit boundary.
"""

from __future__ import annotations

from typing import ClassVar

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from duo_vllm.kv_cache.spec import DuoStreamingSpec


def gap_blocks(sink: int, recent: int, block_size: int, num_computed_tokens: int) -> tuple[int, int]:
    """Block range ``[first, last)`` no future query of the request can read.

    The next query sits at position ``num_computed_tokens`` and reads ``[0, sink)`` and
    ``[num_computed_tokens - recent + 1, ...)``; later queries read even later tokens.
    """
    first = cdiv(sink, block_size)
    last = max(0, num_computed_tokens - recent + 1) // block_size
    return first, max(first, last)


class DuoStreamingManager(FullAttentionManager):
    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: DuoStreamingSpec, **kwargs) -> None:
        # vLLM admits a new request only if its whole prompt's blocks fit, capped for specs that
        # recycle blocks (sliding window, chunked local) at what one request can hold at once;
        # without the cap a long prompt would wait forever for streaming blocks it never holds.
        kwargs["max_admission_blocks_per_request"] = kv_cache_spec.max_blocks_in_step()
        super().__init__(kv_cache_spec, **kwargs)
        self.sink = kv_cache_spec.sink
        self.recent = kv_cache_spec.recent

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        first, last = gap_blocks(self.sink, self.recent, self.block_size, processed_computed_tokens)
        self._remove_blocks_in_range(request_id, first, last)

    def num_held_blocks(self, request_id: str) -> int:
        """Physical blocks the request holds in this group (null entries excluded)."""
        return sum(1 for block in self.req_to_blocks.get(request_id, ()) if not block.is_null)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool,
                               kv_cache_spec, drop_eagle_block, alignment_tokens,
                               dcp_world_size=1, pcp_world_size=1):
        assert isinstance(kv_cache_spec, DuoStreamingSpec)
        if dcp_world_size > 1 or pcp_world_size > 1 or drop_eagle_block:
            raise NotImplementedError(
                "DUO streaming heads support neither context parallelism nor EAGLE/MTP drafting.")
        block_size = kv_cache_spec.block_size
        block_hashes = resolve_block_hashes(
            block_hashes, block_pool.hash_block_size, block_size,
            supports_fine_grained_hash_lookup=False, alignment_tokens=alignment_tokens)
        max_blocks = min(max_length // block_size, len(block_hashes))
        num_groups = len(kv_cache_group_ids)
        cache: dict[int, list | None] = {}

        def cached(i: int):
            if i not in cache:
                cache[i] = block_pool.get_cached_block(block_hashes[i], kv_cache_group_ids) or None
            return cache[i]

        # Every hit longer than the sink needs all sink blocks: a missing one caps the hit there.
        for i in range(min(kv_cache_spec.sink_blocks(), max_blocks)):
            if cached(i) is None:
                max_blocks = i
                break
        for n in range(max_blocks, 0, -1):
            if (n * block_size) % alignment_tokens:
                continue
            first, last = gap_blocks(kv_cache_spec.sink, kv_cache_spec.recent, block_size, n * block_size)
            needed = [*range(min(first, n)), *range(max(first, last), n)]
            if all(cached(i) is not None for i in needed):
                result = tuple([block_pool.null_block] * n for _ in range(num_groups))
                for i in needed:
                    for group, block in zip(result, cached(i)):
                        group[i] = block
                return result, n * block_size
        return tuple([] for _ in range(num_groups)), 0
