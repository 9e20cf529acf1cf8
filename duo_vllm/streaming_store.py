"""Where streaming heads' K/V live, behind one small interface.

The backend writes streaming heads' new K/V with :meth:`write` and reads the positions a query
may see with :meth:`gather`; the attention math (``duo_vllm.ops``) never touches storage. This
store mirrors vLLM's paged slots in a plain [slot, head, dim] layout: vLLM's CPU kernels keep
K/V in ISA-specific packed layouts that other code must not read, and sharing vLLM's slot ids
makes chunked prefill and prefix-cache hits correct with no extra bookkeeping (a cached block's
streaming K/V sit in the same slots). Its footprint is that of full attention for the streaming
heads; a fixed sink + recent store per request is the block-manager extension's job.
"""

from __future__ import annotations

import torch


class PagedStreamingStore:
    """K/V of one layer's streaming heads, addressed by vLLM slot id (block * block_size + offset)."""

    def __init__(self, num_slots: int, num_heads: int, head_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.key = torch.zeros(num_slots, num_heads, head_size, dtype=dtype, device=device)
        self.value = torch.zeros_like(self.key)

    @property
    def num_slots(self) -> int:
        return self.key.shape[0]

    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """key/value [T, heads, D] for the streaming heads; slot_mapping [>= T], -1 = padding."""
        slots = slot_mapping[: key.shape[0]]
        valid = slots >= 0
        if not bool(valid.all()):
            slots, key, value = slots[valid], key[valid], value[valid]
        self.key[slots] = key
        self.value[slots] = value

    def gather(self, block_row: torch.Tensor, positions: torch.Tensor,
               block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [len(positions), heads, D] of one request, given its block-table row."""
        slots = block_row[positions // block_size].long() * block_size + positions % block_size
        return self.key[slots], self.value[slots]
