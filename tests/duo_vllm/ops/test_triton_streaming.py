"""The GPU streaming kernels (duo_vllm.ops.triton_streaming), run in Triton's interpreter on CPU,
against the plain-torch Λ attention and the CPU streaming store.

Batches mix what vLLM schedules: decode requests, first prefill chunks, later chunks after a
cached context, and padding requests (no query, length 0) as in CUDA-graph replays. Blocks the
KV-cache manager would have freed (wholly between the sinks and the first query's window) point
at a shared "null" block filled with NaN: any read of them would show in the output.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="the test extra installs triton (its interpreter runs on CPU)")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import duo_vllm.ops.triton_streaming as kernels  # noqa: E402
from duo_vllm.ops.lambda_attention import lambda_attention  # noqa: E402
from duo_vllm.ops.triton_streaming import lambda_paged_attention, store_kv_heads  # noqa: E402
from duo_vllm.streaming_store import StreamingKV  # noqa: E402

# the interpreter's own NumPy deprecation noise, once per program
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")


def test_kernels_run_interpreted():
    """tests/conftest.py sets TRITON_INTERPRET before triton is first imported (by anything)."""
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(triton.language.standard.zeros, InterpretedFunction), "triton was imported first"
    for name in ("_online_softmax_step", "_score_key_tile", "_attend_key_range", "_lambda_paged_attention_kernel",
                 "_lambda_decode_split_kernel", "_merge_splits_kernel", "_store_kv_kernel"):
        assert isinstance(getattr(kernels, name), InterpretedFunction), f"{name} is not interpreted"


def build_batch(requests, *, sink, recent, page, num_kv, group, head_dim, gen, dtype=torch.float32):
    """requests: list of (seq_len, q_len). Returns everything the kernel and the reference need."""
    num_q = num_kv * group
    max_blocks = max(1, max(-(-n // page) for n, _ in requests))
    dense_k = [torch.randn(n, num_kv, head_dim, generator=gen, dtype=dtype) for n, _ in requests]
    dense_v = [torch.randn(n, num_kv, head_dim, generator=gen, dtype=dtype) for n, _ in requests]
    total_blocks = 1 + sum(-(-n // page) for n, _ in requests)
    # one spare head slot, as a tensor-parallel rank's padding
    cache = torch.randn(total_blocks, num_kv + 1, page, 2 * head_dim, generator=gen, dtype=dtype)
    cache[0] = float("nan")  # the null block
    block_table = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    next_block = 1
    for r, (n, q_len) in enumerate(requests):
        first_query = n - q_len
        for b in range(-(-n // page)):
            lo, hi = b * page, min((b + 1) * page, n)
            needed = lo < sink or hi - 1 >= first_query - recent + 1
            if not needed:
                continue  # freed gap block: the table names the null block
            block_table[r, b] = next_block
            for j in range(lo, hi):
                cache[next_block, :num_kv, j - lo, :head_dim] = dense_k[r][j]
                cache[next_block, :num_kv, j - lo, head_dim:] = dense_v[r][j]
            next_block += 1
    q_lens = [q for _, q in requests]
    query_start = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    num_tokens = int(query_start[-1])
    # streaming query heads are interleaved with retrieval heads in the layer's query tensor
    total_heads = 2 * num_q + 1
    q_heads = torch.arange(num_q, dtype=torch.long) * 2 + 1
    query = torch.randn(num_tokens, total_heads, head_dim, generator=gen, dtype=dtype)
    seq_lens = torch.tensor([n for n, _ in requests], dtype=torch.int32)
    return dict(cache=cache, block_table=block_table, query_start=query_start, seq_lens=seq_lens,
                query=query, q_heads=q_heads, dense_k=dense_k, dense_v=dense_v, num_q=num_q,
                max_query_len=max(q_lens))


def reference(batch, requests, *, sink, recent, scale):
    out = {}
    for r, (n, q_len) in enumerate(requests):
        if q_len == 0:
            continue
        begin = int(batch["query_start"][r])
        q = batch["query"][begin:begin + q_len][:, batch["q_heads"]]
        out[r] = lambda_attention(q, batch["dense_k"][r], batch["dense_v"][r], torch.arange(n - q_len, n),
                                  torch.arange(n), sink=sink, recent=recent, scale=scale)
    return out


def run_kernel(batch, *, sink, recent, scale, num_kv, num_splits=None):
    output = torch.full_like(batch["query"], 7.0)
    lambda_paged_attention(batch["query"], output, batch["cache"], batch["block_table"], batch["query_start"],
                           batch["seq_lens"], batch["max_query_len"], batch["q_heads"], num_kv_heads=num_kv,
                           sink=sink, recent=recent, scale=scale, num_splits=num_splits)
    return output


def check(requests, *, sink, recent, page, num_kv, group, head_dim=16, seed=0, num_splits=None):
    gen = torch.Generator().manual_seed(seed)
    batch = build_batch(requests, sink=sink, recent=recent, page=page, num_kv=num_kv, group=group,
                        head_dim=head_dim, gen=gen)
    scale = head_dim ** -0.5
    output = run_kernel(batch, sink=sink, recent=recent, scale=scale, num_kv=num_kv, num_splits=num_splits)
    want = reference(batch, requests, sink=sink, recent=recent, scale=scale)
    other_heads = torch.ones(output.shape[1], dtype=torch.bool)
    other_heads[batch["q_heads"]] = False
    assert bool((output[:, other_heads] == 7.0).all()), "the kernel wrote a head it does not own"
    for r, expected in want.items():
        begin = int(batch["query_start"][r])
        got = output[begin:begin + expected.shape[0]][:, batch["q_heads"]]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_mixed_batch_matches_reference(group):
    # decode past the window, decode inside the window, first chunk, later chunk after a
    # cached context (gap blocks freed), and a padding request
    requests = [(90, 1), (7, 1), (70, 70), (150, 37), (0, 0)]
    check(requests, sink=6, recent=20, page=8, num_kv=2, group=group)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 50])
def test_decode_only_batch_with_graph_padding(num_splits):
    # 1: one program per (request, KV head); more: split keys + merge (50 is capped at one
    # split per DECODE_BLOCK_N keys); the window straddles a sink/window split boundary
    requests = [(300, 1), (33, 1), (1, 1), (0, 0), (0, 0), (97, 1)]
    check(requests, sink=16, recent=64, page=16, num_kv=3, group=2, head_dim=32, num_splits=num_splits)


@settings(max_examples=20, deadline=None)
@given(sink=st.integers(1, 40), recent=st.integers(1, 120), page=st.sampled_from([1, 4, 16]),
       group=st.sampled_from([1, 2, 5, 8]), num_splits=st.integers(2, 8),
       seq_lens=st.lists(st.integers(0, 300), min_size=1, max_size=4), seed=st.integers(0, 10_000))
def test_split_decode_matches_reference(sink, recent, page, group, num_splits, seq_lens, seed):
    check([(n, 1 if n else 0) for n in seq_lens], sink=sink, recent=recent, page=page, num_kv=2, group=group,
          seed=seed, num_splits=num_splits)


def test_decode_splits_fill_the_sms_only_when_idle():
    assert kernels.decode_splits(4, 132, 320) == 10  # batch 1, 4 streaming KV heads: one split per 32 keys
    assert kernels.decode_splits(24, 132, 320) == 5  # enough to cover the SMs
    assert kernels.decode_splits(64, 132, 320) == 2
    assert kernels.decode_splits(128, 132, 320) == 1  # a full wave already: no merge pass
    assert kernels.decode_splits(4, 132, 20) == 1  # a window shorter than one split
    assert kernels.decode_splits(0, 132, 320) == 1


def test_head_dim_not_power_of_two():
    check([(120, 40), (64, 1)], sink=4, recent=16, page=4, num_kv=1, group=2, head_dim=24)


@settings(max_examples=25, deadline=None)
@given(sink=st.integers(1, 20), recent=st.integers(1, 40), page=st.sampled_from([1, 4, 16]),
       group=st.sampled_from([1, 2, 5]),
       requests=st.lists(st.integers(1, 160).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, min(n, 90)))),
                         min_size=1, max_size=3),
       seed=st.integers(0, 10_000))
def test_any_batch_matches_reference(sink, recent, page, group, requests, seed):
    check(requests, sink=sink, recent=recent, page=page, num_kv=2, group=group, seed=seed)


def test_store_writes_both_caches_and_skips_padding():
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_kv, head_dim = 9, 4, 16
    key = torch.randn(num_tokens, num_kv, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv, head_dim, generator=gen)
    retrieval, streaming = torch.tensor([0, 2]), torch.tensor([3, 1])
    r_slots = torch.tensor([17, 18, -1, 0, 31, 5, -1, 2, 3])
    s_slots = torch.tensor([5, 6, -1, 0, 11, 12, -1, 2])  # shorter than key: CUDA-graph padding
    r_cache, s_cache = torch.zeros(3, 2, 16, 2 * head_dim), torch.zeros(4, 3, 4, 2 * head_dim)
    want_r, want_s = r_cache.clone(), s_cache.clone()
    store_kv_heads(key, value, [(retrieval, r_cache, r_slots), (streaming, s_cache, s_slots)])
    StreamingKV(want_r, head_dim, 2).write(key[:8, retrieval], value[:8, retrieval], r_slots[:8])
    StreamingKV(want_s, head_dim, 2).write(key[:8, streaming], value[:8, streaming], s_slots)
    assert torch.equal(r_cache, want_r) and torch.equal(s_cache, want_s)
    assert int((s_cache != 0).any(-1).sum()) == 6 * 2  # 6 real tokens x 2 heads, padding skipped
    # one target alone (a layer whose heads are all streaming)
    only = torch.zeros_like(s_cache)
    store_kv_heads(key, value, [(torch.tensor([], dtype=torch.long), r_cache, r_slots), (streaming, only, s_slots)])
    assert torch.equal(only, want_s)


# ---- FP8 KV cache (--kv-cache-dtype fp8) -------------------------------------------------------

FP8 = torch.float8_e4m3fn


def fp8_batch(requests, *, sink, recent, page, num_kv, group, head_dim, seed, fp8_query):
    """A batch whose pages hold e4m3 codes (x / scale) and, optionally, an FP8 query, as vLLM
    hands them to DUO under --kv-cache-dtype fp8; the reference sees the dequantized values."""
    from duo_vllm.kv_quant import dequantize_fp8, quantize_fp8

    gen = torch.Generator().manual_seed(seed)
    batch = build_batch(requests, sink=sink, recent=recent, page=page, num_kv=num_kv, group=group,
                        head_dim=head_dim, gen=gen)
    k_scale, v_scale, q_scale = torch.tensor([0.37]), torch.tensor([1.9]), torch.tensor([0.05])
    cache = batch["cache"]
    codes = torch.cat([quantize_fp8(cache[..., :head_dim], k_scale, FP8),
                       quantize_fp8(cache[..., head_dim:], v_scale, FP8)], dim=-1)
    codes[0] = 0x7F  # the null block: e4m3 NaN
    batch["cache"] = codes.view(FP8)
    batch["dense_k"] = [dequantize_fp8(quantize_fp8(k, k_scale, FP8), k_scale, FP8) for k in batch["dense_k"]]
    batch["dense_v"] = [dequantize_fp8(quantize_fp8(v, v_scale, FP8), v_scale, FP8) for v in batch["dense_v"]]
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if fp8_query:
        q_codes = quantize_fp8(batch["query"], q_scale, FP8)
        batch["reference_query"] = dequantize_fp8(q_codes, q_scale, FP8)
        batch["query"] = q_codes.view(FP8)
        scales["q_scale"] = q_scale
    return batch, scales


@pytest.mark.parametrize("fp8_query", [True, False], ids=["fp8-query", "model-dtype-query"])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_fp8_pages_match_dequantized_reference(fp8_query, num_splits):
    requests = [(90, 1), (7, 1), (70, 70), (150, 37), (0, 0)] if num_splits is None else [(300, 1), (40, 1), (0, 0)]
    sink, recent, num_kv, group, head_dim = 6, 20, 2, 3, 16
    batch, scales = fp8_batch(requests, sink=sink, recent=recent, page=8, num_kv=num_kv, group=group,
                              head_dim=head_dim, seed=5, fp8_query=fp8_query)
    query = batch["query"]
    output = torch.full(query.shape, 7.0)  # the model's dtype (fp32 here)
    lambda_paged_attention(query, output, batch["cache"], batch["block_table"], batch["query_start"],
                           batch["seq_lens"], batch["max_query_len"], batch["q_heads"], num_kv_heads=num_kv,
                           sink=sink, recent=recent, scale=head_dim ** -0.5, num_splits=num_splits, **scales)
    batch["query"] = batch.get("reference_query", query)
    want = reference(batch, requests, sink=sink, recent=recent, scale=head_dim ** -0.5)
    for r, expected in want.items():
        begin = int(batch["query_start"][r])
        got = output[begin:begin + expected.shape[0]][:, batch["q_heads"]]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    assert bool(torch.isfinite(output).all()), "a freed block was read"


def test_fp8_pages_need_their_scales():
    batch, scales = fp8_batch([(20, 1)], sink=2, recent=4, page=4, num_kv=1, group=1, head_dim=16, seed=0,
                              fp8_query=True)
    with pytest.raises(ValueError, match="q_scale"):
        lambda_paged_attention(batch["query"], torch.zeros(batch["query"].shape), batch["cache"],
                               batch["block_table"], batch["query_start"], batch["seq_lens"], 1, batch["q_heads"],
                               num_kv_heads=1, sink=2, recent=4, scale=0.25, k_scale=scales["k_scale"])


def test_fp8_store_writes_scaled_saturated_codes():
    """fp8(x / scale), saturated at 448, in the right slots. The inputs are e4m3 values times
    power-of-two scales, so no rounding is involved: Triton's interpreter does not round like the
    GPU's cvt.rn.satfinite (it drops carries into the exponent), which is why the rounding itself
    is checked on the GPU against vLLM's reshape_and_cache_flash (benchmarks/gpu_check_duo.py)."""
    from duo_vllm.kv_quant import quantize_fp8

    gen = torch.Generator().manual_seed(11)
    num_tokens, num_kv, head_dim = 7, 3, 16
    k_scale, v_scale = torch.tensor([0.5]), torch.tensor([4.0])

    def draw(scale):
        codes = torch.randint(0, 0x7F, (num_tokens, num_kv, head_dim), generator=gen, dtype=torch.uint8)
        codes[..., 0] = 0x7E  # 448, the largest finite e4m3
        x = codes.view(FP8).float() * scale
        x[..., 1] = 1000.0 * scale  # saturates to 448
        x[..., 2] = -1e6 * scale  # to -448
        return x

    key, value = draw(k_scale), draw(v_scale)
    retrieval, streaming = torch.tensor([2]), torch.tensor([0, 1])
    slots = torch.tensor([3, 0, -1, 5, 6, 1, 2])
    r_cache = torch.zeros(2, 1, 4, 2 * head_dim, dtype=torch.uint8).view(FP8)
    s_cache = torch.zeros(2, 2, 4, 2 * head_dim, dtype=torch.uint8).view(FP8)
    store_kv_heads(key, value, [(retrieval, r_cache, slots), (streaming, s_cache, slots)],
                   k_scale=k_scale, v_scale=v_scale)
    for heads, cache in ((retrieval, r_cache), (streaming, s_cache)):
        codes = cache.view(torch.uint8)
        for t, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            got = codes[slot // 4, :, slot % 4]
            want_k, want_v = quantize_fp8(key[t, heads], k_scale, FP8), quantize_fp8(value[t, heads], v_scale, FP8)
            assert torch.equal(got[:, :head_dim], want_k) and torch.equal(got[:, head_dim:], want_v)
            assert bool((got.view(FP8).float()[:, [0, 1]] == 448).all() and (got.view(FP8).float()[:, 2] == -448).all())
    assert int((r_cache.view(torch.uint8) != 0).any(-1).sum()) == 6  # the padding token was skipped
    with pytest.raises(ValueError, match="k_scale"):
        store_kv_heads(key, value, [(streaming, s_cache, slots)])
