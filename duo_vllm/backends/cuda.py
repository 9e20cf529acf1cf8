"""DUO attention on NVIDIA GPUs: retrieval heads through vLLM's FLASH_ATTN (FA3 on Hopper).

This is the correctness path: streaming heads use the same gathered Λ-masked pass as on CPU
(``backends/common.py``), which needs host-side request layouts, so the metadata builder declares
no CUDA-graph support and vLLM runs attention eagerly between piecewise graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from duo_vllm.backends.common import DuoBackendMixin, DuoImplMixin, DuoMetadataBuilderMixin


@dataclass
class DuoAttentionMetadata(FlashAttentionMetadata):
    query_start_host: list[int] | None = None
    seq_lens_host: list[int] | None = None


class DuoAttentionMetadataBuilder(DuoMetadataBuilderMixin, FlashAttentionMetadataBuilder):
    metadata_cls = DuoAttentionMetadata
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.NEVER


class DuoAttentionImpl(DuoImplMixin, FlashAttentionImpl):
    pass


class DuoAttentionBackend(DuoBackendMixin, FlashAttentionBackend):
    impl_cls = DuoAttentionImpl
    builder_cls = DuoAttentionMetadataBuilder
