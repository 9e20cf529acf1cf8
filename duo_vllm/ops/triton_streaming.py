"""Streaming heads on the GPU: Triton kernels that read and write vLLM's paged streaming cache.

:func:`lambda_paged_attention` is the Λ-masked attention of every streaming query head of a
batch in one launch. A program takes one request, one streaming KV head (all its GQA query
heads packed as rows, so each K/V tile is loaded once per KV head) and a tile of that request's
queries; it walks the sink keys, then only the keys inside the tile's recent window. Blocks in
between are never touched (the KV-cache manager has freed them). Everything it needs comes from
device tensors vLLM keeps in persistent buffers (query start offsets, sequence lengths, the
streaming group's block table), so it runs inside CUDA graphs; only the grid's third dimension
(query tiles per request) depends on the step's longest query, which is 1 for decode.

:func:`store_kv_heads` writes a layer's new K/V, retrieval heads into their cache and streaming
heads into theirs, in one launch at vLLM's slot ids (padding slots are -1 and skipped), also
without host synchronisation.

Cache layout, as vLLM 0.32 views a layer's cache: ``[blocks, head slots, block_size, K|V]``
(any strides; K is the first ``head_size`` channels, V the rest).

The kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module is
imported), which is how the test suite checks them against ``duo_vllm.ops.lambda_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
BLOCK_N = 64  # keys per inner step
PREFILL_ROWS = 64  # query rows (tokens x packed GQA heads) per program in prefill


@triton.jit
def _attend_key_range(acc, m_i, l_i, q, pos, start, end, blocks_row_ptr, cache_ptr, stride_cb, stride_cs,
                      head_off, d, d_mask, qk_scale, SINK: tl.constexpr, RECENT: tl.constexpr,
                      PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation over keys [start, end) of one request (log2 domain)."""
    for key0 in range(start, end, BLOCK_N):
        offs_n = key0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blocks = tl.load(blocks_row_ptr + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        base = cache_ptr + blocks[:, None] * stride_cb + head_off + (offs_n % PAGE)[:, None] * stride_cs + d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(base, mask=kv_mask, other=0.0)
        v = tl.load(base + HEAD_DIM, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        keys = offs_n[None, :]
        visible = n_mask[None, :] & (keys <= pos[:, None]) & ((keys < SINK) | (pos[:, None] - keys < RECENT))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no visible key yet keep -inf: use 0 as their shift (no NaN).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _lambda_paged_attention_kernel(
    q_ptr, stride_qt, stride_qh,
    o_ptr, stride_ot, stride_oh,
    cache_ptr, stride_cb, stride_ch, stride_cs,
    block_table_ptr, stride_bt,
    query_start_ptr, seq_lens_ptr, q_heads_ptr,
    qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    SINK: tl.constexpr, RECENT: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    kv = tl.program_id(1)
    tok0 = tl.program_id(2) * BLOCK_Q
    q_begin = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_begin
    if tok0 >= q_len:  # padding request, or a tile past this request's queries
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_valid = (rows // GROUP_PAD < BLOCK_Q) & (g < GROUP) & (tok < q_len)
    head = tl.load(q_heads_ptr + kv * GROUP + g, mask=row_valid, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    token = (q_begin + tok).to(tl.int64)
    q_mask = row_valid[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    pos = context + tok

    first = context + tok0  # the tile's first and last query positions
    last = tl.minimum(first + BLOCK_Q, seq_len) - 1
    sink_end = tl.minimum(SINK, last + 1)
    window_begin = tl.maximum(sink_end, first - RECENT + 1)

    blocks_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    head_off = kv.to(tl.int64) * stride_ch
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_key_range(acc, m_i, l_i, q, pos, 0, sink_end, blocks_row_ptr, cache_ptr,
                                      stride_cb, stride_cs, head_off, d, d_mask, qk_scale,
                                      SINK, RECENT, PAGE, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _attend_key_range(acc, m_i, l_i, q, pos, window_begin, last + 1, blocks_row_ptr, cache_ptr,
                                      stride_cb, stride_cs, head_off, d, d_mask, qk_scale,
                                      SINK, RECENT, PAGE, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_mask)


def lambda_paged_attention(query: torch.Tensor, output: torch.Tensor, cache: torch.Tensor,
                           block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           max_query_len: int, q_heads: torch.Tensor, *, num_kv_heads: int, sink: int,
                           recent: int, scale: float) -> None:
    """Write the streaming heads' Λ-masked attention into ``output``.

    query, output [T, Hq, D] (rows of ``q_heads`` are read / written, the others untouched);
    cache [blocks, head slots, block_size, 2 * D]; block_table [R, max blocks]; query_start_loc
    [R + 1]; seq_lens [R]; q_heads [num_kv_heads * group]: the query heads of streaming KV head
    ``s`` (cache head slot ``s``) are ``q_heads[s * group:(s + 1) * group]``.
    """
    if num_kv_heads == 0 or query.shape[0] == 0:
        return
    head_dim = query.shape[-1]
    group = q_heads.numel() // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    rows = max(16, group_pad) if max_query_len <= 1 else max(PREFILL_ROWS, group_pad)
    block_q = max(1, rows // group_pad) if max_query_len > 1 else 1
    num_reqs = seq_lens.shape[0]
    grid = (num_reqs, num_kv_heads, triton.cdiv(max(max_query_len, 1), block_q))
    _lambda_paged_attention_kernel[grid](
        query, query.stride(0), query.stride(1),
        output, output.stride(0), output.stride(1),
        cache, cache.stride(0), cache.stride(1), cache.stride(2),
        block_table, block_table.stride(0),
        query_start_loc, seq_lens, q_heads,
        scale * LOG2_E,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=rows,
        SINK=sink, RECENT=recent, PAGE=cache.shape[2],
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=BLOCK_N,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )


@triton.jit
def _store_kv_kernel(key_ptr, stride_kt, stride_kh, value_ptr, stride_vt, stride_vh,
                     a_cache_ptr, a_stride_cb, a_stride_ch, a_stride_cs, a_slot_ptr, a_heads_ptr,
                     b_cache_ptr, b_stride_cb, b_stride_ch, b_stride_cs, b_slot_ptr, b_heads_ptr,
                     NUM_A: tl.constexpr, PAGE_A: tl.constexpr, PAGE_B: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    j = tl.program_id(1)
    if j < NUM_A:  # a head of the first cache
        slot = tl.load(a_slot_ptr + t).to(tl.int64)
        head = tl.load(a_heads_ptr + j).to(tl.int64)
        dst = a_cache_ptr + (slot // PAGE_A) * a_stride_cb + j * a_stride_ch + (slot % PAGE_A) * a_stride_cs
    else:
        slot = tl.load(b_slot_ptr + t).to(tl.int64)
        head = tl.load(b_heads_ptr + (j - NUM_A)).to(tl.int64)
        dst = b_cache_ptr + (slot // PAGE_B) * b_stride_cb + (j - NUM_A) * b_stride_ch + (slot % PAGE_B) * b_stride_cs
    if slot < 0:  # padding token
        return
    d = tl.arange(0, BLOCK_D)
    mask = d < HEAD_DIM
    k = tl.load(key_ptr + t * stride_kt + head * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + head * stride_vh + d, mask=mask)
    tl.store(dst + d, k.to(b_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HEAD_DIM + d, v.to(b_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_heads(key: torch.Tensor, value: torch.Tensor,
                   targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Write K/V of a layer's KV heads into up to two paged caches in one launch.

    key/value [T, Hkv, D]; each target is (heads, cache, slot_mapping): KV heads ``heads[i]`` go
    to head slot ``i`` of ``cache`` [blocks, head slots, block_size, 2 * D] at ``slot_mapping``
    (-1: padding, skipped). Only the first ``len(slot_mapping)`` tokens are written: vLLM pads
    key/value for CUDA graphs but not the slot mapping.
    """
    targets = [t for t in targets if t[0].numel() > 0]
    if not targets:
        return
    num_tokens = min([key.shape[0]] + [slots.shape[0] for _, _, slots in targets])
    if num_tokens == 0:
        return
    (a_heads, a_cache, a_slots), (b_heads, b_cache, b_slots) = targets[0], targets[-1]
    num_a = a_heads.numel() if len(targets) == 2 else 0
    head_dim = key.shape[-1]
    _store_kv_kernel[(num_tokens, num_a + b_heads.numel())](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        a_cache, a_cache.stride(0), a_cache.stride(1), a_cache.stride(2), a_slots, a_heads,
        b_cache, b_cache.stride(0), b_cache.stride(1), b_cache.stride(2), b_slots, b_heads,
        NUM_A=num_a, PAGE_A=a_cache.shape[2], PAGE_B=b_cache.shape[2],
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
    )
