"""The cache specs a DUO attention layer reports, and the companion layer holding streaming K/V.

vLLM gives every attention layer exactly one KV-cache spec. A DUO layer with both kinds of
heads needs two (paged full attention for retrieval heads, sink + recent blocks for streaming
heads), so its streaming heads get a companion cache layer, registered next to it in vLLM's
static forward context exactly as in-tree caches without attention of their own are
(DeepSeek's compressor and indexer caches). A layer with no retrieval heads reports the
streaming spec itself; one with no streaming heads needs no companion.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.kv_cache_interface import FullAttentionSpec

from duo_vllm.kv_cache.spec import DuoStreamingSpec, planned_streaming_block_size

COMPANION_SUFFIX = "duo_streaming"


def streaming_spec_for_layer(vllm_config, runtime, layer_index: int, *, head_size: int,
                             head_size_v: int, dtype: torch.dtype) -> DuoStreamingSpec:
    slots = runtime.head_slots
    block_size = planned_streaming_block_size(runtime, vllm_config)
    return DuoStreamingSpec(
        block_size=block_size,
        num_kv_heads=int(slots.streaming[layer_index]),
        head_size=head_size,
        head_size_v=head_size_v,
        dtype=dtype,
        sink=runtime.sink,
        recent=runtime.recent,
        step_tokens=vllm_config.max_in_flight_tokens,
    )


def layer_spec(full_spec: FullAttentionSpec, vllm_config, runtime, layer_index: int):
    """What a DUO attention layer reports instead of stock full attention."""
    slots = runtime.head_slots
    if slots.retrieval[layer_index] == 0:
        return streaming_spec_for_layer(vllm_config, runtime, layer_index,
                                        head_size=full_spec.head_size,
                                        head_size_v=full_spec.head_size_v, dtype=full_spec.dtype)
    return replace(full_spec, num_kv_heads=int(slots.retrieval[layer_index]))


class DuoStreamingCache(torch.nn.Module, AttentionLayerBase):
    """The streaming heads' K/V of one decoder layer, as its own entry in vLLM's KV cache.

    It runs no attention: the DUO layer it belongs to writes and reads ``kv_cache``
    ([blocks, streaming heads, block_size, K|V]) and its metadata from the forward context.
    """

    def __init__(self, layer_name: str, backend: type, runtime, layer_index: int, num_heads: int,
                 head_size: int, head_size_v: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_name = layer_name
        # Query heads of the owning layer: vLLM's metadata builders size scratch space from it.
        self.num_heads = num_heads
        self.kv_cache = torch.tensor([])
        self._backend = backend
        self._runtime = runtime
        self._layer_index = layer_index
        self._head_size = head_size
        self._head_size_v = head_size_v
        self._dtype = dtype
        context = get_current_vllm_config().compilation_config.static_forward_context
        if layer_name in context:
            raise ValueError(f"Duplicate layer name: {layer_name}")
        context[layer_name] = self

    def get_attn_backend(self) -> type:
        return self._backend

    def get_kv_cache_spec(self, vllm_config) -> DuoStreamingSpec:
        return streaming_spec_for_layer(vllm_config, self._runtime, self._layer_index,
                                        head_size=self._head_size, head_size_v=self._head_size_v,
                                        dtype=self._dtype)

    def forward(self) -> None:  # never called: the owning DUO layer reads kv_cache directly
        raise RuntimeError("DuoStreamingCache holds K/V only")
