"""DUO attention on NVIDIA GPUs: retrieval heads through vLLM's FLASH_ATTN (FA3 on Hopper).

This is the correctness path: streaming heads use the same gathered Λ-masked pass as on CPU
(``backends/common.py``), which needs host-side request layouts, so the metadata builder declares
no CUDA-graph support and vLLM runs attention eagerly between piecewise graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from duo_vllm.backends.common import DuoImplMixin, check_supported


@dataclass
class DuoAttentionMetadata(FlashAttentionMetadata):
    query_start_host: list[int] | None = None
    seq_lens_host: list[int] | None = None


class DuoAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.NEVER

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DuoAttentionMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        return DuoAttentionMetadata(
            **{f.name: getattr(base, f.name) for f in fields(FlashAttentionMetadata)},
            query_start_host=common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist(),
            seq_lens_host=common_attn_metadata.seq_lens[:num_reqs].cpu().tolist(),
        )


class DuoAttentionBackend(FlashAttentionBackend):
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


class DuoAttentionImpl(DuoImplMixin, FlashAttentionImpl):
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
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if plan.any_streaming:
            num_blocks, _, block_size, _ = kv_cache.shape
            self.write_streaming(plan, key, value, slot_mapping, num_blocks, block_size)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query [T, Hq, D]; kv_cache [blocks, Hk, block_size, 2 * D]; output [T, Hq * D]."""
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        plan = self.head_plan(layer)
        if plan.any_retrieval:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
        if plan.any_streaming:
            num_blocks, _, block_size, _ = kv_cache.shape
            self.streaming_forward(
                plan, query, output, num_tokens=attn_metadata.num_actual_tokens,
                query_start=attn_metadata.query_start_host, seq_lens=attn_metadata.seq_lens_host,
                block_table=attn_metadata.block_table, num_blocks=num_blocks, block_size=block_size)
        return output
