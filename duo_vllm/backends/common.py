"""What the DUO backends share on every platform: option checks, the per-layer head plan, the
streaming store and the streaming-head pass. Platform files only glue these to vLLM's kernels.

::

    request r in the batch:   |<------------- seq_lens[r] ------------->|
                              |<---- context (cached) ---->|<- query ->|
                              0                 seq_lens[r] - q_len     seq_lens[r]
    a streaming query at i sees [0, sink) and [i - recent + 1, i]
"""

from __future__ import annotations

from dataclasses import fields
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata

from duo_vllm.backends.head_plan import HeadPlan, plan_for_layer
from duo_vllm.ops.lambda_attention import lambda_attention, lambda_key_positions
from duo_vllm.runtime import runtime_from_vllm_config
from duo_vllm.streaming_store import PagedStreamingStore

# Queries of one request handled per streaming step: bounds the score matrix to
# chunk x (sink + recent + chunk) whatever the prompt length.
QUERY_CHUNK = 256


def check_supported(*, alibi_slopes, sliding_window, sinks, logits_soft_cap, attn_type, kv_cache_dtype) -> None:
    unsupported = {
        "ALiBi slopes": alibi_slopes is not None,
        "a sliding window": sliding_window is not None,
        "learned attention sinks": sinks is not None,
        "logit soft-capping": bool(logits_soft_cap),
        f"attention type {attn_type}": attn_type != AttentionType.DECODER,
        f"KV cache dtype {kv_cache_dtype!r} (use --kv-cache-dtype auto)": kv_cache_dtype != "auto",
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"The DUO backend does not support {', '.join(bad)}; serve this model without "
            "--attention-backend DUO or change the listed setting."
        )


class DuoBackendMixin:
    """Mixed in before a platform's AttentionBackend; the platform file names its classes."""

    impl_cls: ClassVar[type]
    builder_cls: ClassVar[type]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "DUO"

    @classmethod
    def get_impl_cls(cls) -> type:
        return cls.impl_cls

    @classmethod
    def get_builder_cls(cls) -> type:
        return cls.builder_cls

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class DuoMetadataBuilderMixin:
    """Mixed in before a platform's metadata builder: adds host copies of the request layout.

    ``metadata_cls`` subclasses the platform's metadata with ``query_start_host`` and
    ``seq_lens_host`` (lists) fields.
    """

    metadata_cls: ClassVar[type]

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        return self.metadata_cls(
            **{f.name: getattr(base, f.name) for f in fields(base)},
            query_start_host=common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist(),
            seq_lens_host=common_attn_metadata.seq_lens[:num_reqs].cpu().tolist(),
        )


class DuoImplMixin:
    """Mixed in before a platform's AttentionImpl (which provides num_heads, head_size, scale and
    the stock kernel through ``super()``)."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        check_supported(alibi_slopes=alibi_slopes, sliding_window=sliding_window, sinks=sinks,
                        logits_soft_cap=logits_soft_cap, attn_type=attn_type, kv_cache_dtype=kv_cache_dtype)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        # Resolving the pattern here makes every configuration error a start-up error.
        self.runtime = runtime_from_vllm_config(get_current_vllm_config())
        self._plan: HeadPlan | None = None
        self._store: PagedStreamingStore | None = None

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        plan = self.head_plan(layer)
        if plan.any_retrieval:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if plan.any_streaming:
            num_blocks, _, block_size, _ = kv_cache.shape
            self.write_streaming(plan, key, value, slot_mapping, num_blocks, block_size)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query [T, Hq, D]; kv_cache [blocks, Hk, block_size, 2 * D]; output [T, Hq * D]."""
        if attn_metadata is None:  # profiling / warm-up run: the platform decides what to return
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
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

    def head_plan(self, layer) -> HeadPlan:
        if self._plan is None:
            self._plan = plan_for_layer(self.runtime, layer.layer_name, self.num_heads, self.num_kv_heads)
        return self._plan

    def streaming_store(self, plan: HeadPlan, num_blocks: int, block_size: int,
                        like: torch.Tensor) -> PagedStreamingStore:
        if self._store is None or self._store.num_slots != num_blocks * block_size:
            self._store = PagedStreamingStore(num_blocks * block_size, len(plan.streaming_kv_heads),
                                              self.head_size, like.dtype, like.device)
        return self._store

    def write_streaming(self, plan: HeadPlan, key, value, slot_mapping, num_blocks: int, block_size: int) -> None:
        heads = plan.streaming_kv_heads.to(key.device)
        store = self.streaming_store(plan, num_blocks, block_size, key)
        store.write(key[:, heads], value[:, heads], slot_mapping)

    def streaming_forward(self, plan: HeadPlan, query: torch.Tensor, output: torch.Tensor, *,
                          num_tokens: int, query_start: list[int], seq_lens: list[int],
                          block_table: torch.Tensor, num_blocks: int, block_size: int) -> None:
        """Overwrite the streaming heads' rows of ``output`` [T, Hq * D] with Λ-masked attention."""
        store = self.streaming_store(plan, num_blocks, block_size, query)
        device = query.device
        q_all = query[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        out_all = output[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        q_heads = plan.streaming_q_heads.to(device)
        sink, recent = self.runtime.sink, self.runtime.recent
        for r, seq_len in enumerate(seq_lens):
            context = seq_len - (query_start[r + 1] - query_start[r])
            block_row = block_table[r]
            for begin in range(context, seq_len, QUERY_CHUNK):
                end = min(begin + QUERY_CHUNK, seq_len)
                k_pos = lambda_key_positions(begin, end, sink=sink, recent=recent).to(device)
                keys, values = store.gather(block_row, k_pos, block_size)
                rows = slice(query_start[r] + begin - context, query_start[r] + end - context)
                out_all[rows, q_heads] = lambda_attention(
                    q_all[rows][:, q_heads], keys, values,
                    torch.arange(begin, end, device=device), k_pos,
                    sink=sink, recent=recent, scale=self.scale,
                ).to(out_all.dtype)
