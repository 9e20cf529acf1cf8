"""What the DUO backends share on every platform: option checks, the per-layer head plan, the
streaming store and the streaming-head pass. Platform files only glue these to vLLM's kernels.

::

    request r in the batch:   |<------------- seq_lens[r] ------------->|
                              |<---- context (cached) ---->|<- query ->|
                              0                 seq_lens[r] - q_len     seq_lens[r]
    a streaming query at i sees [0, sink) and [i - recent + 1, i]
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType

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


class DuoImplMixin:
    """Mixed into a platform's AttentionImpl subclass (which provides num_heads, head_size, scale)."""

    def _init_duo(self) -> None:
        # Resolving the pattern here makes every configuration error a start-up error.
        self.runtime = runtime_from_vllm_config(get_current_vllm_config())
        self._plan: HeadPlan | None = None
        self._store: PagedStreamingStore | None = None

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
