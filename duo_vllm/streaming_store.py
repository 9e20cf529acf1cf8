"""Where streaming heads' K/V live, behind one small interface.

The backend writes streaming heads' new K/V with :meth:`StreamingKV.write` and reads the
positions a query may see with :meth:`StreamingKV.gather`; the attention math
(``duo_vllm.ops``) never touches storage. The storage is a page of vLLM's own KV-cache pool
(the streaming group of ``duo_vllm.kv_cache``), viewed as [blocks, heads, block_size, K|V] in
plain layout: only DUO code reads and writes it, so no platform kernel's packed layout applies.
Blocks between the sinks and the recent window are freed by the manager; their block-table
entries then name vLLM's null block and are never gathered. Under an FP8 KV cache
(``--kv-cache-dtype fp8``) pages hold FP8 codes written and read through ``duo_vllm.kv_quant``.
"""

from __future__ import annotations

import torch

from duo_vllm.kv_quant import Fp8KV


class StreamingKV:
    """One layer's streaming heads in vLLM's paged cache, addressed by vLLM slot ids."""

    def __init__(self, kv_cache: torch.Tensor, head_size: int, num_heads: int | None = None,
                 fp8: Fp8KV | None = None) -> None:
        # kv_cache [blocks, head slots, block_size, 2 * head_size]; a tensor-parallel rank may
        # use fewer heads than the spec's slots (the rest are padding). fp8: the cache holds
        # uint8 FP8 codes (gathered K/V come back dequantized, in float32).
        self.cache = kv_cache
        self.head_size = head_size
        self.num_heads = kv_cache.shape[1] if num_heads is None else num_heads
        self.fp8 = fp8

    @property
    def block_size(self) -> int:
        return self.cache.shape[2]

    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """key/value [T, heads, D] for the streaming heads; slot_mapping [>= T], -1 = padding."""
        slots = slot_mapping[: key.shape[0]].long()
        valid = slots >= 0
        if not bool(valid.all()):
            slots, key, value = slots[valid], key[valid], value[valid]
        blocks, offsets = slots // self.block_size, slots % self.block_size
        d, h = self.head_size, self.num_heads
        if self.fp8 is not None:
            key, value = self.fp8.quantize(key, value)
        self.cache[blocks, :h, offsets, :d] = key.to(self.cache.dtype)
        self.cache[blocks, :h, offsets, d:] = value.to(self.cache.dtype)

    def _split(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = kv[..., : self.head_size], kv[..., self.head_size:]
        if self.fp8 is not None:
            key, value = self.fp8.dequantize(key, value)
        return key, value

    def gather(self, block_row: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [len(positions), heads, D] of one request, given its block-table row."""
        blocks = block_row[positions // self.block_size].long()
        return self._split(self.cache[blocks, : self.num_heads, positions % self.block_size])

    def gather_batched(self, block_table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [R, K, heads, D] at ``positions`` [R, K] of the requests whose block-table rows
        are ``block_table`` [R, blocks per request]."""
        blocks = torch.gather(block_table, 1, positions // self.block_size).long()
        return self._split(self.cache[blocks, : self.num_heads, positions % self.block_size])  # [R, K, heads, D]
