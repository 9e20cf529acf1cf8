"""DUO attention on vLLM's CPU platform (the V1 ``CPUModelRunner``, where CI runs).

Retrieval heads go through vLLM's own CPU paged-attention kernel exactly as CPU_ATTN runs them;
streaming heads are recomputed with the exact Λ mask from the K/V they may see (sink + window),
gathered per request (``backends/common.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from duo_vllm.backends.common import DuoImplMixin, check_supported


@dataclass
class DuoAttentionMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata plus host copies of the per-request layout for streaming heads."""

    query_start_host: list[int] | None = None
    seq_lens_host: list[int] | None = None


class DuoAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DuoAttentionMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        return DuoAttentionMetadata(
            **{f.name: getattr(base, f.name) for f in fields(CPUAttentionMetadata)},
            query_start_host=common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist(),
            seq_lens_host=common_attn_metadata.seq_lens[:num_reqs].tolist(),
        )


class DuoAttentionBackend(CPUAttentionBackend):
    """Selected by ``--attention-backend DUO`` on CPU."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "DUO"

    @staticmethod
    def get_impl_cls() -> type["DuoAttentionImpl"]:
        return DuoAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[DuoAttentionMetadataBuilder]:
        return DuoAttentionMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class DuoAttentionImpl(DuoImplMixin, CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        check_supported(alibi_slopes=alibi_slopes, sliding_window=sliding_window, sinks=sinks,
                        logits_soft_cap=logits_soft_cap, attn_type=attn_type, kv_cache_dtype=kv_cache_dtype)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self._init_duo()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        plan = self.head_plan(layer)
        if plan.any_retrieval:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if plan.any_streaming:
            num_blocks, _, block_size, _ = kv_cache.shape
            self.write_streaming(plan, key, value, slot_mapping, num_blocks, block_size)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query [T, Hq, D]; kv_cache [blocks, Hk, block_size, 2 * D] (LBHNC); output [T, Hq * D]."""
        if attn_metadata is None:  # profiling / warm-up run
            return output
        plan = self.head_plan(layer)
        if plan.any_retrieval:
            # The stock kernel computes every head; streaming heads are overwritten below.
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
        if plan.any_streaming:
            num_blocks, _, block_size, _ = kv_cache.shape
            self.streaming_forward(
                plan, query, output, num_tokens=attn_metadata.num_actual_tokens,
                query_start=attn_metadata.query_start_host, seq_lens=attn_metadata.seq_lens_host,
                block_table=attn_metadata.block_table, num_blocks=num_blocks, block_size=block_size)
        return output
