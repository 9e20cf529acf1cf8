"""The KV-cache spec of one layer's streaming heads, and how many blocks it needs.

A request's streaming heads see tokens ``[0, sink)`` and the last ``recent`` tokens, so the
group keeps ``ceil(sink / block_size)`` sink blocks plus the blocks covering the window;
everything between is freed by :class:`duo_vllm.kv_cache.manager.DuoStreamingManager`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec


_BETWEEN_STEPS: ContextVar[bool] = ContextVar("duo_between_steps", default=False)


@contextmanager
def between_steps_footprint() -> Iterator[None]:
    """Within it, :meth:`DuoStreamingSpec.max_memory_usage_bytes` counts a request's footprint
    between steps (sink + window), not its in-step peak: the figure vLLM reports as its KV-cache
    size in tokens. The in-flight chunk is one per step, not one per request, so charging every
    request for it would understate how many requests the pool holds."""
    token = _BETWEEN_STEPS.set(True)
    try:
        yield
    finally:
        _BETWEEN_STEPS.reset(token)


@dataclass(frozen=True, kw_only=True)
class DuoStreamingSpec(AttentionSpec):
    """Paged K/V of a layer's streaming heads: only sink and recent blocks stay allocated."""

    sink: int
    recent: int
    # Most tokens one request computes in a step (vLLM's max_in_flight_tokens): their streaming
    # K/V are written to blocks before they are attended, and freed right after.
    step_tokens: int = 0

    def sink_blocks(self) -> int:
        return cdiv(self.sink, self.block_size)

    def max_blocks_in_step(self, in_flight_tokens: int | None = None) -> int:
        """Blocks one request can hold during a step: sink, window and the tokens in flight
        (``step_tokens`` unless given)."""
        in_flight = self.step_tokens if in_flight_tokens is None else in_flight_tokens
        return self.sink_blocks() + cdiv(self.recent - 1 + in_flight, self.block_size) + 1

    def max_blocks_per_request(self, max_model_len: int) -> int:
        """Blocks one request holds between steps: sink blocks, the window, one block of slack.

        The window can straddle one more block boundary than its length needs, hence the
        ``+ 1``. DUO's report and vLLM's capacity figure count this footprint; pool sizing and
        admission count :meth:`max_admission_blocks_per_request`.
        """
        window = cdiv(self.recent - 1, self.block_size) + 1
        return min(self.sink_blocks() + window, cdiv(max_model_len, self.block_size))

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """Blocks one request holds at its peak: within a step it also holds the blocks of the
        tokens it is computing (written before they are attended, freed right after).

        As for vLLM's own recycling specs (sliding window, chunked local), this one figure sizes
        the pool at start-up (the one-request check, ``--max-model-len -1`` auto-fit, 0.34's
        refit after warm-up, all through :meth:`max_memory_usage_bytes`) and caps admission
        (:class:`duo_vllm.kv_cache.manager.DuoStreamingManager`), so a request admitted at
        start-up can always be scheduled.
        """
        return min(self.max_blocks_in_step(max_in_flight_tokens), cdiv(max_model_len, self.block_size))

    def max_memory_usage_bytes(self, vllm_config) -> int:
        max_len = vllm_config.model_config.max_model_len
        if _BETWEEN_STEPS.get():
            blocks = self.max_blocks_per_request(max_len)
        else:
            blocks = self.max_admission_blocks_per_request(vllm_config.max_in_flight_tokens, max_len)
        return blocks * self.page_size_bytes

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(spec, DuoStreamingSpec) and (spec.sink, spec.recent) == (self.sink, self.recent)
            for spec in kv_cache_specs.values()
        )


def planned_streaming_block_size(runtime, vllm_config) -> int:
    """The streaming group's block size for one engine configuration, decided by the first call
    and kept in ``runtime.kv_layout`` under that configuration's ``cache_config``: after planning,
    vLLM's engine core sets ``cache_config.block_size`` to the smallest group block size, and
    asking again with that must not change the streaming spec. Another engine in the process
    (its own ``cache_config``, maybe another block size) decides for itself. The layer specs and
    the KV report both read it here."""
    cache_config = vllm_config.cache_config
    entry = runtime.kv_layout.get(id(cache_config))
    if entry is None or entry[0] is not cache_config:  # holding the config keeps its id() unique
        slots = runtime.head_slots
        block = streaming_block_size(
            cache_config.block_size, int(slots.retrieval.sum()), int(slots.streaming.sum()),
            sink=runtime.sink, recent=runtime.recent, max_model_len=vllm_config.model_config.max_model_len)
        entry = runtime.kv_layout[id(cache_config)] = (cache_config, block)
    return entry[1]


def streaming_block_size(retrieval_block_size: int, retrieval_heads: int, streaming_heads: int, *,
                         sink: int, recent: int, max_model_len: int, min_block_size: int = 1) -> int:
    """Block size of the streaming group that fits the most requests of ``max_model_len``.

    Both groups draw block ids from one pool, and a block costs the larger of the two groups'
    pages summed over layers (``retrieval_heads * retrieval_block_size`` against
    ``streaming_heads * size`` head-token slots). Candidates are power-of-two multiples and
    fractions of the retrieval block size, so prefix-cache hashes stay aligned; the one with the
    smallest bytes per request at ``max_model_len`` wins (larger blocks on ties).
    """
    if streaming_heads <= 0 or retrieval_heads <= 0:
        return retrieval_block_size
    candidates = {retrieval_block_size}
    size = retrieval_block_size
    while size % 2 == 0 and size // 2 >= min_block_size:
        size //= 2
        candidates.add(size)
    candidates.update(retrieval_block_size * 2**k for k in range(1, 4))

    def bytes_per_request(size: int) -> tuple[int, int]:
        block_slots = max(retrieval_heads * retrieval_block_size, streaming_heads * size)
        spec = DuoStreamingSpec(block_size=size, num_kv_heads=1, head_size=1, dtype=torch.int8,
                                sink=sink, recent=recent)
        blocks = cdiv(max_model_len, retrieval_block_size) + spec.max_blocks_per_request(max_model_len)
        return blocks * block_slots, -size

    return min(candidates, key=bytes_per_request)
