"""DUO attention on NVIDIA GPUs: retrieval heads through vLLM's FLASH_ATTN (FA3 on Hopper).

This is the correctness path: streaming heads use the same gathered Λ-masked pass as on CPU
(``backends/common.py``), which needs host-side request layouts, so the metadata builder declares
no CUDA-graph support and vLLM runs attention eagerly between piecewise graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from vllm.v1.attention.backend import AttentionCGSupport, KVCacheLayout
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from duo_vllm.backends.common import (
    DuoBackendMixin,
    DuoImplMixin,
    DuoMetadataBuilderMixin,
    DuoMetadataFields,
    kernel_query_heads,
)


@dataclass
class DuoAttentionMetadata(DuoMetadataFields, FlashAttentionMetadata):
    pass


class DuoAttentionMetadataBuilder(DuoMetadataBuilderMixin, FlashAttentionMetadataBuilder):
    metadata_cls = DuoAttentionMetadata
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # FA3's ahead-of-time schedule is per query-head count.
        self.num_heads_q = kernel_query_heads(kv_cache_spec, vllm_config)


class DuoAttentionImpl(DuoImplMixin, FlashAttentionImpl):
    pass


class DuoAttentionBackend(DuoBackendMixin, FlashAttentionBackend):
    impl_cls = DuoAttentionImpl
    builder_cls = DuoAttentionMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Block-outermost: both KV-cache groups' pages of every layer share one block
        # (duo_vllm.kv_cache.grouping); FlashAttention reads the cache through its strides.
        return (KVCacheLayout.BLNHC, KVCacheLayout.BLHNC)
