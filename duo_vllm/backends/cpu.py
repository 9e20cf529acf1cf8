"""DUO attention on vLLM's CPU platform (the V1 ``CPUModelRunner``, where CI runs).

Retrieval heads go through vLLM's own CPU paged-attention kernel exactly as CPU_ATTN runs them;
streaming heads are recomputed with the exact Λ mask from the K/V they may see (sink + window),
gathered per request, so their result never depends on tokens outside sink + recent.

::

    request r in the batch:   |<------------- seq_lens[r] ------------->|
                              |<---- context (cached) ---->|<- query ->|
                              0                 seq_lens[r] - q_len     seq_lens[r]
    streaming query at i sees [0, sink) and [i - recent + 1, i]
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from duo_vllm.backends.head_plan import HeadPlan, plan_for_layer
from duo_vllm.ops.lambda_attention import lambda_attention, lambda_key_positions
from duo_vllm.runtime import runtime_from_vllm_config
from duo_vllm.streaming_store import PagedStreamingStore

# Queries of one request handled per streaming step: bounds the score matrix to
# chunk x (sink + recent + chunk) whatever the prompt length.
_QUERY_CHUNK = 256


@dataclass
class DuoAttentionMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata plus host copies of the per-request layout for streaming heads."""

    query_start_host: list[int] | None = None
    seq_lens_host: list[int] | None = None


class DuoAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> DuoAttentionMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        return DuoAttentionMetadata(
            **{f.name: getattr(base, f.name) for f in fields(CPUAttentionMetadata)},
            query_start_host=common_attn_metadata.query_start_loc[: num_reqs + 1].tolist(),
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


class DuoAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            "a sliding window": sliding_window is not None,
            "learned attention sinks": sinks is not None,
            "logit soft-capping": bool(logits_soft_cap),
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            f"KV cache dtype {kv_cache_dtype}": kv_cache_dtype != "auto",
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(
                f"The DUO backend does not support {', '.join(bad)}; serve this model without "
                "--attention-backend DUO (or with --kv-cache-dtype auto)."
            )
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        # Resolving the pattern here makes every configuration error a start-up error.
        self.runtime = runtime_from_vllm_config(get_current_vllm_config())
        self._plan: HeadPlan | None = None
        self._store: PagedStreamingStore | None = None

    def _head_plan(self, layer) -> HeadPlan:
        if self._plan is None:
            self._plan = plan_for_layer(self.runtime, layer.layer_name, self.num_heads, self.num_kv_heads)
        return self._plan

    def _streaming_store(self, plan: HeadPlan, kv_cache: torch.Tensor) -> PagedStreamingStore:
        num_blocks, _, block_size, _ = kv_cache.shape
        if self._store is None or self._store.num_slots != num_blocks * block_size:
            self._store = PagedStreamingStore(num_blocks * block_size, len(plan.streaming_kv_heads),
                                              self.head_size, kv_cache.dtype, kv_cache.device)
        return self._store

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        plan = self._head_plan(layer)
        if plan.any_retrieval:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if plan.any_streaming:
            heads = plan.streaming_kv_heads
            self._streaming_store(plan, kv_cache).write(key[:, heads], value[:, heads], slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query [T, Hq, D]; kv_cache [blocks, Hk, block_size, 2 * D] (LBHNC); output [T, Hq * D]."""
        if attn_metadata is None:  # profiling / warm-up run
            return output
        plan = self._head_plan(layer)
        if plan.any_retrieval:
            # The stock kernel computes every head; streaming heads are overwritten below.
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
        if plan.any_streaming:
            self._streaming_forward(plan, query, kv_cache, attn_metadata, output)
        return output

    def _streaming_forward(self, plan: HeadPlan, query: torch.Tensor, kv_cache: torch.Tensor,
                           meta: DuoAttentionMetadata, output: torch.Tensor) -> None:
        num_tokens = meta.num_actual_tokens
        block_size = kv_cache.shape[2]
        store = self._streaming_store(plan, kv_cache)
        q_all = query[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        out_all = output[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        q_heads = plan.streaming_q_heads
        sink, recent = self.runtime.sink, self.runtime.recent
        starts, seq_lens = meta.query_start_host, meta.seq_lens_host
        for r, seq_len in enumerate(seq_lens):
            q_len = starts[r + 1] - starts[r]
            context = seq_len - q_len
            block_row = meta.block_table[r]
            for begin in range(context, seq_len, _QUERY_CHUNK):
                end = min(begin + _QUERY_CHUNK, seq_len)
                k_pos = lambda_key_positions(begin, end, sink=sink, recent=recent)
                keys, values = store.gather(block_row, k_pos, block_size)
                rows = slice(starts[r] + begin - context, starts[r] + end - context)
                out_all[rows, q_heads] = lambda_attention(
                    q_all[rows, q_heads], keys, values,
                    torch.arange(begin, end), k_pos,
                    sink=sink, recent=recent, scale=self.scale,
                ).to(out_all.dtype)


__all__ = ["DuoAttentionBackend", "DuoAttentionImpl", "DuoAttentionMetadata",
           "DuoAttentionMetadataBuilder"]
