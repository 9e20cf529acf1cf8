"""Plain-torch reference of DuoAttention, and a way to run a Hugging Face model with it.

The tests compare vLLM's DUO backend against this: it is written densely and independently of
``duo_vllm.ops`` (full score matrix, one mask per head) so that a bug in the backend's gathering
or chunking cannot hide in the reference too.

Semantics (per sequence, positions 0..T-1): a retrieval head is causal attention; a streaming head
lets query ``i`` see key ``j`` iff ``j <= i`` and (``j < sink`` or ``i - j < recent``).
"""

from __future__ import annotations

import numpy as np
import torch

from duo_vllm.pattern import kv_to_query_heads

ATTN_IMPLEMENTATION = "duo_reference"
QUERY_CHUNK = 2048  # query rows per dense score matrix in the Hugging Face wrapper


def duo_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    retrieval_q_heads: torch.Tensor,
    *,
    sink: int,
    recent: int,
    scale: float,
    q_offset: int | None = None,
) -> torch.Tensor:
    """DuoAttention for one sequence, dense, in fp32.

    Parameters
    ----------
    query : [T, Hq, D], the last T positions of the sequence
    key, value : [S, Hk, D], all S positions (S >= T); GQA maps query head h to key head h // (Hq/Hk)
    retrieval_q_heads : bool [Hq], True where the query head is a retrieval head
    q_offset : absolute position of query[0]; defaults to S - T

    Returns
    -------
    [T, Hq, D] in ``query.dtype``
    """
    num_tokens, num_q_heads, _ = query.shape
    seq_len, num_kv_heads, _ = key.shape
    offset = seq_len - num_tokens if q_offset is None else q_offset
    group = num_q_heads // num_kv_heads
    q = query.float().permute(1, 0, 2)
    k = key.float().permute(1, 0, 2).repeat_interleave(group, 0)
    v = value.float().permute(1, 0, 2).repeat_interleave(group, 0)
    scores = q @ k.transpose(1, 2) * scale  # [Hq, T, S]

    device = query.device
    i = torch.arange(num_tokens, device=device).view(-1, 1) + offset
    j = torch.arange(seq_len, device=device).view(1, -1)
    causal = j <= i
    streaming = causal & ((j < sink) | (i - j < recent))
    masks = torch.where(retrieval_q_heads.to(device).view(-1, 1, 1), causal, streaming)
    scores = scores.masked_fill(~masks, float("-inf"))
    return (torch.softmax(scores, -1) @ v).permute(1, 0, 2).to(query.dtype)


def _hf_duo_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: query [B, Hq, T, D], key/value [B, Hk, S, D]."""
    retrieval = getattr(module, "duo_retrieval_q_heads", None)
    if retrieval is None:
        raise RuntimeError(
            "This model uses the duo_reference attention but has no pattern: call "
            "duo_vllm.reference.use_duo_reference(model, mask, sink=..., recent=...) first."
        )
    if attention_mask is not None and query.shape[0] > 1:
        raise ValueError("The DuoAttention reference runs unpadded sequences only: use batch size 1.")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    rounding = getattr(module, "duo_round", None)
    if rounding is not None:  # what a quantized KV cache (and query) reads back as
        query, key, value = rounding(query, "q"), rounding(key, "k"), rounding(value, "v")
    num_tokens, seq_len = query.shape[2], key.shape[2]
    outputs = []
    for b in range(query.shape[0]):
        q, k, v = (t[b].transpose(0, 1) for t in (query, key, value))
        # Query chunks bound the dense score matrix ([Hq, QUERY_CHUNK, S] fp32) at long contexts;
        # each chunk sees the keys up to its own last position, so the math is unchanged.
        chunks = []
        for start in range(0, num_tokens, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, num_tokens)
            first = seq_len - num_tokens + start
            keys_seen = seq_len - num_tokens + stop
            chunks.append(duo_attention(q[start:stop], k[:keys_seen], v[:keys_seen], retrieval,
                                        sink=module.duo_sink, recent=module.duo_recent, scale=scale,
                                        q_offset=first))
        outputs.append(torch.cat(chunks))
    return torch.stack(outputs), None


def use_duo_reference(model, retrieval_mask: np.ndarray, *, sink: int, recent: int, rounding=None):
    """Make a Hugging Face decoder run DuoAttention with ``retrieval_mask`` [layers, kv_heads].

    Works through transformers' attention interface (no per-model code): every attention module
    with a ``layer_idx`` gets its row of the pattern. ``rounding(tensor, "q" | "k" | "v")``, when
    given, replaces attention inputs by what the served cache reads back (e.g. an FP8 KV cache:
    ``duo_vllm.kv_quant.round_through_fp8``). Returns the model.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_duo_attention)
    config = model.config
    num_q_heads = config.num_attention_heads
    q_mask = kv_to_query_heads(np.asarray(retrieval_mask, dtype=bool), num_q_heads)
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if len(layers) != q_mask.shape[0]:
        raise ValueError(f"Pattern has {q_mask.shape[0]} layers, model has {len(layers)} attention layers.")
    for module in layers:
        module.duo_retrieval_q_heads = torch.from_numpy(q_mask[module.layer_idx].copy())
        module.duo_sink = sink
        module.duo_recent = recent
        module.duo_round = rounding
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
