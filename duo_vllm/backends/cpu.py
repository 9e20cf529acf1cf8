"""DUO attention on vLLM's CPU platform (the V1 ``CPUModelRunner``, where CI runs).

Retrieval heads go through vLLM's own CPU paged-attention kernel exactly as CPU_ATTN runs them;
streaming heads are recomputed with the exact Λ mask from the K/V they may see (sink + window),
gathered per request (``backends/gathered_streaming.py``). The cache layout is block-outermost (BLHNC) so both KV-cache groups share each block.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backend import KVCacheLayout
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from duo_vllm.backends.common import DuoBackendMixin, DuoImplMixin, kernel_query_heads
from duo_vllm.backends.gathered_streaming import (
    DuoMetadataBuilderMixin,
    DuoMetadataFields,
    GatheredStreaming,
)
from duo_vllm.kv_quant import SUPPORTED_KV_CACHE_DTYPES


@dataclass
class DuoAttentionMetadata(DuoMetadataFields, CPUAttentionMetadata):
    pass


class DuoAttentionMetadataBuilder(DuoMetadataBuilderMixin, CPUAttentionMetadataBuilder):
    metadata_cls = DuoAttentionMetadata

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.num_heads = kernel_query_heads(kv_cache_spec, vllm_config)


class DuoAttentionImpl(DuoImplMixin, CPUAttentionBackendImpl):
    """Retrieval heads: vLLM's CPU kernel and cache write; streaming heads: the gathered pass."""

    # vLLM's CPU kernel assumes contiguous query and output rows.
    kernel_takes_head_slices = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.streaming = GatheredStreaming(num_heads=self.num_heads, head_size=self.head_size, scale=self.scale,
                                           kv_cache_dtype=self.kv_cache_dtype, sink=self.runtime.sink,
                                           recent=self.runtime.recent)

    def write_kv(self, layer, plan, key, value, kv_cache, slot_mapping, streaming_cache, streaming_slots) -> None:
        if plan.any_retrieval:  # vLLM's own CPU cache write, for the retrieval heads only
            heads = plan.retrieval_kv_heads
            CPUAttentionBackendImpl.do_kv_cache_update(self, layer, key[:, heads], value[:, heads],
                                                       kv_cache[:, :heads.numel()], slot_mapping)
        self.streaming.write(layer, plan, key, value, streaming_cache, streaming_slots)

    def streaming_forward(self, layer, plan, query, out_heads, cache, metadata) -> None:
        self.streaming.forward(layer, plan, query, out_heads, cache, metadata)


class DuoAttentionBackend(DuoBackendMixin, CPUAttentionBackend):
    """Selected by ``--attention-backend DUO`` on CPU."""

    supported_kv_cache_dtypes = list(SUPPORTED_KV_CACHE_DTYPES["cpu"])

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Block-outermost: the retrieval and streaming groups' pages of every layer share one
        # block (duo_vllm.kv_cache.grouping). The CPU kernel reads blocks through their stride.
        return (KVCacheLayout.BLHNC,)

    impl_cls = DuoAttentionImpl
    builder_cls = DuoAttentionMetadataBuilder
