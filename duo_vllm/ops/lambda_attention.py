"""Streaming-head attention with the exact per-token Λ mask.

A streaming head lets query position ``i`` see key position ``j`` iff ``j <= i`` and
(``j < sink`` or ``i - j < recent``): the first ``sink`` tokens of the sequence plus a window of
``recent`` tokens that ends at (and includes) the query itself. The same rule holds in prefill,
chunked prefill, prefix-cached continuation and decode, so a streaming head never needs more
than ``sink + recent`` cached tokens. This is stricter than the reference implementation, whose
streaming heads also see the whole current prefill chunk (up to 32K tokens): ours matches what
the gates were trained with.

The functions here take K/V already gathered (from whatever storage holds them) together with
their absolute positions, so they do not depend on where streaming K/V live.
"""

from __future__ import annotations

import torch


def lambda_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, *, sink: int, recent: int) -> torch.Tensor:
    """Boolean visibility [len(q_pos), len(k_pos)] of the Λ mask."""
    q = q_pos[:, None]
    k = k_pos[None, :]
    return (k <= q) & ((k < sink) | (q - k < recent))


def lambda_key_positions(start: int, end: int, *, sink: int, recent: int) -> torch.Tensor:
    """Absolute key positions that queries at positions ``[start, end)`` can see, ascending."""
    window_start = max(start - recent + 1, 0)
    if window_start <= sink:
        return torch.arange(0, end, dtype=torch.long)
    return torch.cat([
        torch.arange(0, min(sink, end), dtype=torch.long),
        torch.arange(window_start, end, dtype=torch.long),
    ])


def lambda_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    sink: int,
    recent: int,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query`` over gathered ``key``/``value`` under the Λ mask, in fp32.

    Parameters
    ----------
    query : [T, Hq, D]
    key, value : [N, Hk, D] with ``Hq % Hk == 0`` (GQA: query head h uses key head h // (Hq/Hk))
    q_pos : [T] absolute positions of the queries
    k_pos : [N] absolute positions of the keys

    Returns
    -------
    [T, Hq, D] in ``query.dtype``. Every query must see at least itself (its own key included).
    """
    num_q_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_q_heads // num_kv_heads
    q = query.float().transpose(0, 1)  # [Hq, T, D]
    k = key.float().transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, N, D]
    v = value.float().transpose(0, 1).repeat_interleave(group, dim=0)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [Hq, T, N]
    visible = lambda_visible(q_pos.to(k_pos.device), k_pos, sink=sink, recent=recent)
    scores.masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(0, 1).to(query.dtype)


def lambda_decode_positions(seq_lens: torch.Tensor, *, sink: int, recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions of one decode query per request, batched.

    For a request of ``L`` tokens the query sits at ``L - 1`` and sees ``[0, min(sink, L))`` and
    ``[max(sink, L - recent), L)``. Returns positions [R, sink + recent] and a validity mask of
    the same shape; invalid (padding) entries hold position 0, which every request has, so they
    can index storage safely.
    """
    slots = torch.arange(sink + recent, device=seq_lens.device)
    lens = seq_lens.to(torch.long)[:, None]
    is_sink = slots[None, :] < sink
    window = lens - recent + (slots[None, :] - sink)
    positions = torch.where(is_sink, slots[None, :].expand_as(window), window)
    valid = torch.where(is_sink, positions < lens, (positions >= sink) & (positions >= 0))
    return positions.masked_fill(~valid, 0), valid


def lambda_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            valid: torch.Tensor, *, scale: float) -> torch.Tensor:
    """One query per request over its gathered keys, in fp32 (the batched form of
    :func:`lambda_attention` for decode steps).

    query [R, Hq, D]; key, value [R, K, Hk, D]; valid [R, K] (False: padding, never attended).
    Returns [R, Hq, D] in ``query.dtype``.
    """
    num_reqs, num_q_heads, head_size = query.shape
    num_kv_heads = key.shape[2]
    group = num_q_heads // num_kv_heads
    q = query.float().view(num_reqs, num_kv_heads, group, head_size)
    k = key.float().transpose(1, 2)  # [R, Hk, K, D]
    v = value.float().transpose(1, 2)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [R, Hk, g, K]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).reshape(num_reqs, num_q_heads, head_size).to(query.dtype)
