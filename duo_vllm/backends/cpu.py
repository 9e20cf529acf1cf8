"""DUO attention on vLLM's CPU platform (the V1 ``CPUModelRunner``, where CI runs).

Retrieval heads go through vLLM's own CPU paged-attention kernel exactly as CPU_ATTN runs them;
streaming heads are recomputed with the exact Λ mask from the K/V they may see (sink + window),
gathered per request (``backends/common.py``). The cache layout is CPU_ATTN's (LBHNC).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from duo_vllm.backends.common import DuoBackendMixin, DuoImplMixin, DuoMetadataBuilderMixin


@dataclass
class DuoAttentionMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata plus host copies of the per-request layout for streaming heads."""

    query_start_host: list[int] | None = None
    seq_lens_host: list[int] | None = None


class DuoAttentionMetadataBuilder(DuoMetadataBuilderMixin, CPUAttentionMetadataBuilder):
    metadata_cls = DuoAttentionMetadata


class DuoAttentionImpl(DuoImplMixin, CPUAttentionBackendImpl):
    pass


class DuoAttentionBackend(DuoBackendMixin, CPUAttentionBackend):
    """Selected by ``--attention-backend DUO`` on CPU."""

    impl_cls = DuoAttentionImpl
    builder_cls = DuoAttentionMetadataBuilder
