"""Streaming heads in plain PyTorch, for platforms without a streaming kernel (vLLM's CPU).

The streaming pass gathers each request's visible K/V (sink + window) from the paged streaming
cache and attends with ``duo_vllm.ops.lambda_attention``; it loops over requests on the host,
so the metadata builder adds host copies of the request layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from duo_vllm.kv_quant import Fp8KV
from duo_vllm.ops.lambda_attention import (
    lambda_attention,
    lambda_decode_attention,
    lambda_decode_positions,
    lambda_key_positions,
)
from duo_vllm.streaming_store import StreamingKV
from duo_vllm.vllm_support import platform_name

# Queries of one request handled per streaming step: bounds the score matrix to
# chunk x (sink + recent + chunk) whatever the prompt length.
QUERY_CHUNK = 256


@dataclass
class DuoMetadataFields:
    """What DUO adds to a platform's attention metadata. Listed first among the bases of the
    platform's metadata dataclass, so these defaulted fields follow the platform's own."""

    query_start_host: list[int] | None = None
    seq_lens_host: list[int] | None = None
    duo_decode_reqs: torch.Tensor | None = None  # request index of each decode request
    duo_decode_tokens: torch.Tensor | None = None  # its query's row in the flattened batch
    duo_decode_seq_lens: torch.Tensor | None = None


class DuoMetadataBuilderMixin:
    """Mixed in before a platform's metadata builder: adds host copies of the request layout.

    ``metadata_cls`` is the platform's metadata with :class:`DuoMetadataFields`.
    """

    metadata_cls: ClassVar[type]

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        query_start = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = common_attn_metadata.seq_lens[:num_reqs].cpu().tolist()
        # Requests with one query this step (decode) get the batched streaming pass; their
        # indices are built once here for every layer of the group.
        decode = [r for r in range(num_reqs) if query_start[r + 1] - query_start[r] == 1]
        device = common_attn_metadata.seq_lens.device
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return self.metadata_cls(
            **{f.name: getattr(base, f.name) for f in fields(base)},
            query_start_host=query_start,
            seq_lens_host=seq_lens,
            duo_decode_reqs=as_tensor(decode),
            duo_decode_tokens=as_tensor([query_start[r] for r in decode]),
            duo_decode_seq_lens=as_tensor([seq_lens[r] for r in decode]),
        )


class GatheredStreaming:
    """Streaming heads in plain PyTorch (the CPU path): K/V gathered per request, then attended.

    Held by the platform's Impl as its streaming pass. Decode requests (one query) go through one
    batched gather and attention; the others (prefill chunks) per request and per chunk of at most
    ``QUERY_CHUNK`` queries. Needs the host copies of the request layout from
    :class:`DuoMetadataBuilderMixin`.
    """

    def __init__(self, *, num_heads: int, head_size: int, scale: float, kv_cache_dtype: str,
                 sink: int, recent: int):
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.kv_cache_dtype, self.sink, self.recent = kv_cache_dtype, sink, recent

    def store(self, layer, cache: torch.Tensor, num_heads: int) -> StreamingKV:
        """The layer's streaming cache. An FP8 cache (--kv-cache-dtype fp8*) holds codes in the
        format and rounding the platform kernel uses for the retrieval heads, with the layer's scales."""
        return StreamingKV(cache, self.head_size, num_heads, Fp8KV.for_layer(layer, self.kv_cache_dtype, platform_name()))

    def write(self, layer, plan, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor,
              slots: torch.Tensor) -> None:
        """Store the streaming heads' new K/V (key/value [T, Hkv, D]) at ``slots``."""
        heads = plan.streaming_kv_heads
        self.store(layer, cache, heads.numel()).write(key[:, heads], value[:, heads], slots)

    def forward(self, layer, plan, query, out_heads, cache, metadata) -> None:
        """Write the streaming heads' Λ-masked attention into ``out_heads`` [T, Hq, D]."""
        store = self.store(layer, cache, plan.streaming_kv_heads.numel())
        device = query.device
        num_tokens = out_heads.shape[0]
        q_all = query[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        q_heads = plan.streaming_q_heads
        sink, recent = self.sink, self.recent
        block_table = metadata.block_table
        if metadata.duo_decode_reqs.numel():
            rows = metadata.duo_decode_tokens
            positions, valid = lambda_decode_positions(metadata.duo_decode_seq_lens, sink=sink, recent=recent)
            keys, values = store.gather_batched(block_table[metadata.duo_decode_reqs], positions)
            out_heads[rows[:, None], q_heads[None, :]] = lambda_decode_attention(
                q_all[rows][:, q_heads], keys, values, valid, scale=self.scale).to(out_heads.dtype)
        query_start, seq_lens = metadata.query_start_host, metadata.seq_lens_host
        for r, seq_len in enumerate(seq_lens):
            q_len = query_start[r + 1] - query_start[r]
            if q_len <= 1:
                continue  # decode: done above (or no query this step)
            context = seq_len - q_len
            block_row = block_table[r]
            for begin in range(context, seq_len, QUERY_CHUNK):
                end = min(begin + QUERY_CHUNK, seq_len)
                k_pos = lambda_key_positions(begin, end, sink=sink, recent=recent).to(device)
                keys, values = store.gather(block_row, k_pos)
                rows = slice(query_start[r] + begin - context, query_start[r] + end - context)
                out_heads[rows, q_heads] = lambda_attention(
                    q_all[rows][:, q_heads], keys, values,
                    torch.arange(begin, end, device=device), k_pos,
                    sink=sink, recent=recent, scale=self.scale,
                ).to(out_heads.dtype)
