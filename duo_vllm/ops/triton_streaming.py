"""Streaming heads on the GPU: Triton kernels that read and write vLLM's paged streaming cache.

:func:`lambda_paged_attention` is the Λ-masked attention of every streaming query head of a
batch in one launch. A program takes one request, one streaming KV head (all its GQA query
heads packed as rows, so each K/V tile is loaded once per KV head) and a tile of that request's
queries; it walks the sink keys, then only the keys inside the tile's recent window. Blocks in
between are never touched (the KV-cache manager has freed them). Everything it needs comes from
device tensors vLLM keeps in persistent buffers (query start offsets, sequence lengths, the
streaming group's block table), so it runs inside CUDA graphs; only the grid's third dimension
(query tiles per request) depends on the step's longest query, which is 1 for decode.

Decode steps with few (request, streaming KV head) pairs, batch 1 above all, would leave most
SMs idle while each program walks its few key tiles one dependent load after another; there the
keys are split across programs (FlashDecoding's split-K) and a second launch, one program per
query head, merges the partial softmaxes (:func:`decode_splits` picks the split count from the grid size and the SM count, so
it is fixed per CUDA-graph batch size).

:func:`store_kv_heads` writes a layer's new K/V, retrieval heads into their cache and streaming
heads into theirs, in one launch at vLLM's slot ids (padding slots are -1 and skipped), also
without host synchronisation.

Cache layout, as vLLM 0.32 views a layer's cache: ``[blocks, head slots, block_size, K|V]``
(any strides; K is the first ``head_size`` channels, V the rest). With ``--kv-cache-dtype fp8``
pages hold e4m3 codes of ``x / scale`` (vLLM's per-tensor k/v scales): the store quantizes as
vLLM's own CUDA cache write does, the attention kernels widen codes to the compute dtype in
registers and fold the scales into the score scale and the output.

The kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module is
imported), which is how the test suite checks them against ``duo_vllm.ops.lambda_attention``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
BLOCK_N = 64  # keys per inner step
PREFILL_ROWS = 64  # query rows (tokens x packed GQA heads) per program in prefill
DECODE_BLOCK_N = 32  # keys per split-decode step: the smallest tile tl.dot takes well


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION: tl.constexpr):
    """Fold one tile of masked scores ``s`` (log2 domain, -inf where hidden) and values ``v`` in."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows that have seen no visible key yet keep -inf: use 0 as their shift (no NaN).
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _load_query_and_scales(q_ptrs, q_mask, qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr,
                           COMPUTE: tl.constexpr, Q_SCALED: tl.constexpr, KV_SCALED: tl.constexpr):
    """The query tile in the compute dtype, the score scale (log2 domain) with the FP8 descales of
    q and k folded in, and the value descale."""
    q = tl.load(q_ptrs, mask=q_mask, other=0.0).to(COMPUTE)
    v_scale = 1.0
    if Q_SCALED:
        qk_scale = qk_scale * tl.load(q_scale_ptr)
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    return q, qk_scale, v_scale


@triton.jit
def _score_key_tile(q, keys, n_mask, blocks_row_ptr, cache_ptr, stride_cb, stride_cs, head_off, d, d_mask,
                    qk_scale, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores (log2 domain) of ``q`` against the keys at token positions ``keys`` of one request,
    read through its block table, and their values; masked-out keys read as 0."""
    blocks = tl.load(blocks_row_ptr + keys // PAGE, mask=n_mask, other=0).to(tl.int64)
    base = cache_ptr + blocks[:, None] * stride_cb + head_off + (keys % PAGE)[:, None] * stride_cs + d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    # FP8 pages: codes widen exactly to q's dtype here; their scales are folded into qk_scale
    # and into the output (a no-op conversion for unquantized pages).
    k = tl.load(base, mask=kv_mask, other=0.0).to(q.dtype)
    v = tl.load(base + HEAD_DIM, mask=kv_mask, other=0.0).to(q.dtype)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale, v


@triton.jit
def _attend_key_range(acc, m_i, l_i, q, pos, start, end, blocks_row_ptr, cache_ptr, stride_cb, stride_cs,
                      head_off, d, d_mask, qk_scale, SINK: tl.constexpr, RECENT: tl.constexpr,
                      PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation over keys [start, end) of one request (log2 domain)."""
    for key0 in range(start, end, BLOCK_N):
        offs_n = key0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        s, v = _score_key_tile(q, offs_n, n_mask, blocks_row_ptr, cache_ptr, stride_cb, stride_cs, head_off, d,
                               d_mask, qk_scale, PAGE, HEAD_DIM, DOT_PRECISION)
        keys = offs_n[None, :]
        visible = n_mask[None, :] & (keys <= pos[:, None]) & ((keys < SINK) | (pos[:, None] - keys < RECENT))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, tl.where(visible, s, float("-inf")), v, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _lambda_paged_attention_kernel(
    q_ptr, stride_qt, stride_qh,
    o_ptr, stride_ot, stride_oh,
    cache_ptr, stride_cb, stride_ch, stride_cs,
    block_table_ptr, stride_bt,
    query_start_ptr, seq_lens_ptr, q_heads_ptr,
    qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    SINK: tl.constexpr, RECENT: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    Q_SCALED: tl.constexpr, KV_SCALED: tl.constexpr,
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
    q, qk_scale, v_scale = _load_query_and_scales(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], q_mask, qk_scale,
        q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr.dtype.element_ty, Q_SCALED, KV_SCALED)
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
    out = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _lambda_decode_split_kernel(
    q_ptr, stride_qt, stride_qh,
    part_ptr, stride_pr, stride_pk, stride_ps, stride_pm,
    cache_ptr, stride_cb, stride_ch, stride_cs,
    block_table_ptr, stride_bt,
    query_start_ptr, seq_lens_ptr, q_heads_ptr,
    qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_KEYS: tl.constexpr,
    SINK: tl.constexpr, RECENT: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE: tl.constexpr, Q_SCALED: tl.constexpr, KV_SCALED: tl.constexpr,
):
    """One decode query, one streaming KV head, one slice of its sink + window keys.

    The keys a decode query sees are numbered 0.. in order: the sinks, then the window. Split
    ``s`` takes numbers [s * SPLIT_KEYS, (s + 1) * SPLIT_KEYS) and writes its unnormalised
    partial (running max, sum, weighted values) for the merge kernel.
    """
    req = tl.program_id(0)
    kv = tl.program_id(1)
    split = tl.program_id(2)
    q_begin = tl.load(query_start_ptr + req)
    if tl.load(query_start_ptr + req + 1) == q_begin:  # padding request
        return
    seq_len = tl.load(seq_lens_ptr + req)
    sink_end = tl.minimum(SINK, seq_len)
    window_begin = tl.maximum(sink_end, seq_len - RECENT)
    num_keys = sink_end + seq_len - window_begin

    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP
    head = tl.load(q_heads_ptr + kv * GROUP + rows, mask=row_valid, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q, qk_scale, v_scale = _load_query_and_scales(
        q_ptr + q_begin.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
        row_valid[:, None] & d_mask[None, :], qk_scale, q_scale_ptr, k_scale_ptr, v_scale_ptr,
        COMPUTE, Q_SCALED, KV_SCALED)

    blocks_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    head_off = kv.to(tl.int64) * stride_ch
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = split * SPLIT_KEYS
    end = tl.minimum(first + SPLIT_KEYS, num_keys)
    for i0 in range(first, end, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        n_mask = i < end
        keys = tl.where(i < sink_end, i, window_begin + i - sink_end)
        s, v = _score_key_tile(q, keys, n_mask, blocks_row_ptr, cache_ptr, stride_cb, stride_cs, head_off, d,
                               d_mask, qk_scale, PAGE, HEAD_DIM, DOT_PRECISION)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, tl.where(n_mask[None, :], s, float("-inf")), v,
                                             DOT_PRECISION)
    # partials [R, KV, splits, BLOCK_M, BLOCK_D + 2]: weighted values, then max and sum
    part = part_ptr + req.to(tl.int64) * stride_pr + kv * stride_pk + split * stride_ps + rows[:, None] * stride_pm
    tl.store(part + d[None, :], acc * v_scale)
    tl.store(part + BLOCK_D, m_i[:, None])
    tl.store(part + BLOCK_D + 1, l_i[:, None])


@triton.jit
def _merge_splits_kernel(
    o_ptr, stride_ot, stride_oh,
    part_ptr, stride_pr, stride_pk, stride_ps, stride_pm,
    query_start_ptr, q_heads_ptr,
    GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Combine one query head's split partials (log-sum-exp) into its output row.

    One program per (request, streaming query head), all splits loaded at once: walking the
    splits one after another made the merge cost more than the split kernel itself (H200
    profile: 0.18 against 0.12 ms per token at batch 1, 10 splits).
    """
    req = tl.program_id(0)
    row = tl.program_id(1)  # streaming query head: KV head row // GROUP, GQA member row % GROUP
    q_begin = tl.load(query_start_ptr + req)
    if tl.load(query_start_ptr + req + 1) == q_begin:  # padding request
        return
    split = tl.arange(0, SPLITS_PAD)
    s_mask = split < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    part = (part_ptr + req.to(tl.int64) * stride_pr + (row // GROUP) * stride_pk + (row % GROUP) * stride_pm
            + split * stride_ps)
    m_s = tl.load(part + BLOCK_D, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part + BLOCK_D + 1, mask=s_mask, other=0.0)
    acc_s = tl.load(part[:, None] + d[None, :], mask=s_mask[:, None], other=0.0)
    m = tl.max(m_s, 0)
    weight = tl.exp2(m_s - tl.where(m == float("-inf"), 0.0, m))  # splits without keys: 0
    total = tl.sum(l_s * weight, 0)
    out = tl.sum(acc_s * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    head = tl.load(q_heads_ptr + row).to(tl.int64)
    tl.store(o_ptr + q_begin.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def decode_splits(num_programs: int, num_sms: int, max_keys: int) -> int:
    """How many ways to split each decode query's sink + window keys.

    At small batches one program per (request, streaming KV head) leaves most SMs idle and its
    few dependent key tiles make it latency-bound (measured: 12.5 us per layer at batch 1 on an
    H200 for under 1 MB read). Split until the grid covers the SMs, at most one split per
    DECODE_BLOCK_N keys; large batches keep one program each, with no merge pass.
    """
    if num_programs <= 0 or num_programs * 2 > num_sms:
        return 1
    return max(1, min(triton.cdiv(max_keys, DECODE_BLOCK_N), num_sms // num_programs))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _scale_args(query, output, cache, q_scale, k_scale, v_scale, placeholder) -> tuple[list, dict]:
    """The scale pointers and flags of an attention launch: an FP8 query (vLLM's attention layer
    quantizes it with ``q_scale`` for FlashAttention 3) and FP8 pages (``k_scale`` / ``v_scale``)
    are read as ``code * scale``; unscaled launches get a placeholder pointer they never read."""
    q_scaled = query.element_size() == 1
    kv_scaled = cache.element_size() == 1
    if (q_scaled and q_scale is None) or (kv_scaled and (k_scale is None or v_scale is None)):
        raise ValueError("an FP8 query needs q_scale, and FP8 pages k_scale and v_scale")
    pointers = [q_scale if q_scaled else placeholder, k_scale if kv_scaled else placeholder,
                v_scale if kv_scaled else placeholder]
    flags = dict(Q_SCALED=q_scaled, KV_SCALED=kv_scaled,
                 DOT_PRECISION="ieee" if output.dtype == torch.float32 else "tf32")
    return pointers, flags


def lambda_paged_attention(query: torch.Tensor, output: torch.Tensor, cache: torch.Tensor,
                           block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           max_query_len: int, q_heads: torch.Tensor, *, num_kv_heads: int, sink: int,
                           recent: int, scale: float, num_splits: int | None = None,
                           q_scale: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> None:
    """Write the streaming heads' Λ-masked attention into ``output``.

    query, output [T, Hq, D] (rows of ``q_heads`` are read / written, the others untouched);
    cache [blocks, head slots, block_size, 2 * D]; block_table [R, max blocks]; query_start_loc
    [R + 1]; seq_lens [R]; q_heads [num_kv_heads * group]: the query heads of streaming KV head
    ``s`` (cache head slot ``s``) are ``q_heads[s * group:(s + 1) * group]``.

    FP8: a float8 ``query`` is dequantized with ``q_scale``, a float8 ``cache`` with ``k_scale`` /
    ``v_scale`` (one-element device tensors, read on the device so CUDA graphs replay them); the
    math runs in ``output``'s dtype, into which FP8 codes widen exactly.
    """
    if num_kv_heads == 0 or query.shape[0] == 0:
        return
    scale_ptrs, flags = _scale_args(query, output, cache, q_scale, k_scale, v_scale, seq_lens)
    head_dim = query.shape[-1]
    group = q_heads.numel() // num_kv_heads
    num_reqs = seq_lens.shape[0]
    if max_query_len <= 1:
        if num_splits is None:
            sms = _sm_count(query.device.index or 0) if query.is_cuda else 1
            num_splits = decode_splits(num_reqs * num_kv_heads, sms, sink + recent)
        if num_splits > 1:
            _split_decode(query, output, cache, block_table, query_start_loc, seq_lens, q_heads,
                          num_kv_heads=num_kv_heads, group=group, sink=sink, recent=recent, scale=scale,
                          num_splits=num_splits, scale_ptrs=scale_ptrs, flags=flags)
            return
    group_pad = triton.next_power_of_2(group)
    rows = max(16, group_pad) if max_query_len <= 1 else max(PREFILL_ROWS, group_pad)
    block_q = max(1, rows // group_pad) if max_query_len > 1 else 1
    grid = (num_reqs, num_kv_heads, triton.cdiv(max(max_query_len, 1), block_q))
    _lambda_paged_attention_kernel[grid](
        query, query.stride(0), query.stride(1),
        output, output.stride(0), output.stride(1),
        cache, cache.stride(0), cache.stride(1), cache.stride(2),
        block_table, block_table.stride(0),
        query_start_loc, seq_lens, q_heads,
        scale * LOG2_E, *scale_ptrs,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=rows,
        SINK=sink, RECENT=recent, PAGE=cache.shape[2],
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=BLOCK_N, **flags,
    )


def _split_decode(query, output, cache, block_table, query_start_loc, seq_lens, q_heads, *, num_kv_heads,
                  group, sink, recent, scale, num_splits, scale_ptrs, flags) -> None:
    """Decode batches: keys split ``num_splits`` ways, then one merge launch."""
    head_dim = query.shape[-1]
    block_d = triton.next_power_of_2(head_dim)
    block_m = max(16, triton.next_power_of_2(group))
    split_keys = triton.cdiv(triton.cdiv(sink + recent, num_splits), DECODE_BLOCK_N) * DECODE_BLOCK_N
    num_splits = triton.cdiv(sink + recent, split_keys)
    num_reqs = seq_lens.shape[0]
    # Scratch from the caching allocator (inside a CUDA graph, from the graph's own pool).
    partials = torch.empty(num_reqs, num_kv_heads, num_splits, block_m, block_d + 2, dtype=torch.float32,
                           device=query.device)
    strides = (partials.stride(0), partials.stride(1), partials.stride(2), partials.stride(3))
    _lambda_decode_split_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, query.stride(0), query.stride(1),
        partials, *strides,
        cache, cache.stride(0), cache.stride(1), cache.stride(2),
        block_table, block_table.stride(0),
        query_start_loc, seq_lens, q_heads,
        scale * LOG2_E, *scale_ptrs,
        GROUP=group, BLOCK_M=block_m, SPLIT_KEYS=split_keys,
        SINK=sink, RECENT=recent, PAGE=cache.shape[2],
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N, COMPUTE=_TRITON_DTYPES[output.dtype], **flags,
    )
    _merge_splits_kernel[(num_reqs, num_kv_heads * group)](
        output, output.stride(0), output.stride(1),
        partials, *strides,
        query_start_loc, q_heads,
        GROUP=group, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim, BLOCK_D=block_d,
    )


@triton.jit
def _store_kv_kernel(key_ptr, stride_kt, stride_kh, value_ptr, stride_vt, stride_vh,
                     a_cache_ptr, a_stride_cb, a_stride_ch, a_stride_cs, a_slot_ptr, a_heads_ptr,
                     b_cache_ptr, b_stride_cb, b_stride_ch, b_stride_cs, b_slot_ptr, b_heads_ptr,
                     k_scale_ptr, v_scale_ptr,
                     NUM_A: tl.constexpr, PAGE_A: tl.constexpr, PAGE_B: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FP8_MAX: tl.constexpr):
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
    if FP8_MAX > 0:  # FP8 pages: x / scale, saturated, rounded to nearest even, as vLLM's CUDA cache write
        k = tl.clamp(tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)), -FP8_MAX, FP8_MAX)
        v = tl.clamp(tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)), -FP8_MAX, FP8_MAX)
    tl.store(dst + d, k.to(b_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HEAD_DIM + d, v.to(b_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_heads(key: torch.Tensor, value: torch.Tensor,
                   targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Write K/V of a layer's KV heads into up to two paged caches in one launch.

    key/value [T, Hkv, D]; each target is (heads, cache, slot_mapping): KV heads ``heads[i]`` go
    to head slot ``i`` of ``cache`` [blocks, head slots, block_size, 2 * D] at ``slot_mapping``
    (-1: padding, skipped). Only the first ``len(slot_mapping)`` tokens are written: vLLM pads
    key/value for CUDA graphs but not the slot mapping. Float8 caches (both the same dtype) get
    ``fp8(x / scale)`` with the one-element device tensors ``k_scale`` / ``v_scale``.
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
    fp8 = b_cache.element_size() == 1
    if a_cache.dtype != b_cache.dtype or (fp8 and (k_scale is None or v_scale is None)):
        raise ValueError("both caches must have one dtype, and FP8 caches need k_scale and v_scale")
    fp8_max = torch.finfo(b_cache.dtype).max if fp8 else 0.0
    _store_kv_kernel[(num_tokens, num_a + b_heads.numel())](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        a_cache, a_cache.stride(0), a_cache.stride(1), a_cache.stride(2), a_slots, a_heads,
        b_cache, b_cache.stride(0), b_cache.stride(1), b_cache.stride(2), b_slots, b_heads,
        k_scale if fp8 else b_slots, v_scale if fp8 else b_slots,
        NUM_A=num_a, PAGE_A=a_cache.shape[2], PAGE_B=b_cache.shape[2],
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), FP8_MAX=fp8_max,
    )
