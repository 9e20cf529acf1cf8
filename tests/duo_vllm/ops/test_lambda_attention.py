"""Tests of duo_vllm.ops.lambda_attention: the Λ mask, the key positions a chunk needs, and the
chunked streaming attention a backend runs, against brute force and the dense reference."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duo_vllm.ops.lambda_attention import lambda_attention, lambda_key_positions, lambda_visible
from duo_vllm.reference import duo_attention
from tests.helpers.attention import (  # noqa: F401  (one_thread: autouse fixture)
    DTYPES,
    HEAD_DIMS,
    HEADS,
    SEQ_LENS,
    check_close,
    make_qkv,
    one_thread,
    sdpa_causal,
)

SINK_RECENT = [(1, 1), (4, 16), (2, 64)]

PROPERTY = settings(max_examples=150, deadline=None)


# ----------------------------------------------------------------------------- helpers


def brute_visible(i: int, j: int, sink: int, recent: int) -> bool:
    return j <= i and (j < sink or i - j < recent)


def chunk_bounds(start: int, end: int, mode: str, seed: int) -> list[tuple[int, int]]:
    """Query chunks [a, b) covering [start, end): one piece, or random sizes 1..70."""
    if mode == "whole":
        return [(start, end)]
    rng = random.Random(seed)
    bounds, a = [], start
    while a < end:
        b = min(end, a + rng.randint(1, 70))
        bounds.append((a, b))
        a = b
    return bounds


def chunked_lambda(query, key, value, start, end, *, sink, recent, scale, mode="whole", seed=0):
    """Streaming attention for queries at positions [start, end), the way a backend runs it:
    chunk by chunk, each chunk over the K/V rows gathered at lambda_key_positions."""
    outputs = []
    for a, b in chunk_bounds(start, end, mode, seed):
        k_pos = lambda_key_positions(a, b, sink=sink, recent=recent)
        q_pos = torch.arange(a, b)
        outputs.append(
            lambda_attention(
                query[a - start : b - start], key[k_pos], value[k_pos], q_pos, k_pos,
                sink=sink, recent=recent, scale=scale,
            )
        )
    return torch.cat(outputs)


def all_streaming(num_q_heads):
    return torch.zeros(num_q_heads, dtype=torch.bool)


# ----------------------------------------------------------------------------- (a) lambda_visible


@PROPERTY
@given(
    q_pos=st.lists(st.integers(0, 60), min_size=1, max_size=12),
    k_pos=st.lists(st.integers(0, 60), min_size=1, max_size=12),
    sink=st.integers(1, 12),
    recent=st.integers(1, 20),
)
def test_lambda_visible_matches_brute_force(q_pos, k_pos, sink, recent):
    got = lambda_visible(torch.tensor(q_pos), torch.tensor(k_pos), sink=sink, recent=recent)
    assert got.dtype == torch.bool
    assert got.shape == (len(q_pos), len(k_pos))
    for a, i in enumerate(q_pos):
        for b, j in enumerate(k_pos):
            want = brute_visible(i, j, sink, recent)
            assert bool(got[a, b]) == want, (
                f"query {i} / key {j} (sink {sink}, recent {recent}): lambda_visible says "
                f"{bool(got[a, b])}, brute force says {want}"
            )


@pytest.mark.parametrize("sink,recent", [(1, 1), (2, 3), (4, 16)])
def test_lambda_visible_every_query_sees_itself_and_at_most_sink_plus_recent(sink, recent):
    pos = torch.arange(200)
    vis = lambda_visible(pos, pos, sink=sink, recent=recent)
    assert bool(vis.diagonal().all()), "some query does not see its own key"
    assert not bool(vis.triu(1).any()), "some query sees a future key"
    counts = vis.sum(dim=1)
    assert int(counts.max()) == min(200, sink + recent), f"visible keys per query: {counts.tolist()}"


# ----------------------------------------------------------------------------- (b) lambda_key_positions


@PROPERTY
@given(
    start=st.integers(0, 80),
    length=st.integers(1, 40),
    sink=st.integers(1, 12),
    recent=st.integers(1, 30),
)
def test_lambda_key_positions_is_exactly_the_visible_set(start, length, sink, recent):
    end = start + length
    got = lambda_key_positions(start, end, sink=sink, recent=recent)
    assert got.dtype == torch.long, f"dtype {got.dtype}"
    got_list = got.tolist()
    assert got_list == sorted(set(got_list)), f"not strictly ascending / has duplicates: {got_list}"
    want = {j for i in range(start, end) for j in range(i + 1) if brute_visible(i, j, sink, recent)}
    assert set(got_list) == want, (
        f"queries [{start}, {end}) sink {sink} recent {recent}: "
        f"extra {sorted(set(got_list) - want)}, missing {sorted(want - set(got_list))}"
    )


@pytest.mark.parametrize("sink,recent", SINK_RECENT)
def test_lambda_key_positions_decode_needs_at_most_sink_plus_recent(sink, recent):
    for pos in range(0, 300, 7):
        got = lambda_key_positions(pos, pos + 1, sink=sink, recent=recent)
        assert got.numel() == min(pos + 1, sink + recent), f"decode at {pos}: {got.tolist()}"
        assert int(got[-1]) == pos


# ----------------------------------------------------------------------------- (c) chunked == reference


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("sink,recent", SINK_RECENT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_chunked_prefill_matches_reference(
    num_q_heads, num_kv_heads, head_dim, seq_len, dtype, sink, recent, seed
):
    q, k, v = make_qkv(seq_len, num_q_heads, num_kv_heads, head_dim, dtype, seed)
    scale = head_dim**-0.5
    want = duo_attention(q, k, v, all_streaming(num_q_heads), sink=sink, recent=recent, scale=scale)
    for chunking in ("whole", "random"):
        got = chunked_lambda(q, k, v, 0, seq_len, sink=sink, recent=recent, scale=scale,
                             mode=chunking, seed=seed + seq_len)
        check_close(got, want, dtype,
                    f"chunked ({chunking}) lambda_attention vs reference, S={seq_len} Hq={num_q_heads} "
                    f"Hk={num_kv_heads} D={head_dim} sink={sink} recent={recent}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_decode_matches_reference(num_q_heads, num_kv_heads, head_dim, seq_len, dtype):
    """One query at the last position, over the K/V gathered for it (T=1)."""
    q, k, v = make_qkv(seq_len, num_q_heads, num_kv_heads, head_dim, dtype, seed=1)
    scale = head_dim**-0.5
    last = q[-1:]
    for sink, recent in SINK_RECENT:
        want = duo_attention(last, k, v, all_streaming(num_q_heads), sink=sink, recent=recent, scale=scale)
        k_pos = lambda_key_positions(seq_len - 1, seq_len, sink=sink, recent=recent)
        got = lambda_attention(last, k[k_pos], v[k_pos], torch.tensor([seq_len - 1]), k_pos,
                               sink=sink, recent=recent, scale=scale)
        check_close(got, want, dtype, f"decode at position {seq_len - 1}, Hq={num_q_heads} "
                    f"Hk={num_kv_heads} D={head_dim} sink={sink} recent={recent}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_continuation_matches_reference(num_q_heads, num_kv_heads, head_dim, seq_len, dtype):
    """Queries for the last T positions only (prefix-cache hit / chunked prefill continuation)."""
    sink, recent = 4, 16
    q, k, v = make_qkv(seq_len, num_q_heads, num_kv_heads, head_dim, dtype, seed=2)
    scale = head_dim**-0.5
    heads = all_streaming(num_q_heads)
    for num_queries in sorted({min(t, seq_len) for t in (1, 2, 17)}):
        offset = seq_len - num_queries
        tail = q[offset:]
        want = duo_attention(tail, k, v, heads, sink=sink, recent=recent, scale=scale)
        want_explicit = duo_attention(tail, k, v, heads, sink=sink, recent=recent, scale=scale,
                                      q_offset=offset)
        torch.testing.assert_close(want, want_explicit, atol=0, rtol=0,
                                   msg=lambda m: f"reference: default q_offset != explicit S-T\n{m}")
        got = chunked_lambda(tail, k, v, offset, seq_len, sink=sink, recent=recent, scale=scale,
                             mode="random", seed=seq_len)
        check_close(got, want, dtype, f"continuation, queries [{offset}, {seq_len}), Hq={num_q_heads} "
                    f"Hk={num_kv_heads} D={head_dim}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_queries_in_the_middle_with_explicit_q_offset(num_q_heads, num_kv_heads, dtype):
    """Queries at [a, a+T) with K/V for a longer sequence: later keys must stay invisible."""
    seq_len, a, t, sink, recent, head_dim = 99, 40, 13, 3, 10, 64
    q, k, v = make_qkv(seq_len, num_q_heads, num_kv_heads, head_dim, dtype, seed=3)
    scale = head_dim**-0.5
    want = duo_attention(q[a : a + t], k, v, all_streaming(num_q_heads), sink=sink, recent=recent,
                         scale=scale, q_offset=a)
    got = chunked_lambda(q[a : a + t], k, v, a, a + t, sink=sink, recent=recent, scale=scale,
                         mode="random", seed=5)
    check_close(got, want, dtype, f"queries [{a}, {a + t}) of a {seq_len}-token sequence")
    # and the prefix of a full prefill is the same thing
    full = duo_attention(q, k, v, all_streaming(num_q_heads), sink=sink, recent=recent, scale=scale)
    check_close(got, full[a : a + t], dtype, "middle queries vs the same rows of a full prefill")


@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_lambda_mask_actually_matters(num_q_heads, num_kv_heads):
    """Guards against a vacuous comparison: changing sink or recent by one must change the
    output once the sequence is longer than sink + recent, and streaming != causal."""
    seq_len, sink, recent, head_dim = 99, 4, 16, 64
    q, k, v = make_qkv(seq_len, num_q_heads, num_kv_heads, head_dim, torch.float32, seed=4)
    scale = head_dim**-0.5
    base = chunked_lambda(q, k, v, 0, seq_len, sink=sink, recent=recent, scale=scale)
    for s, r in ((sink + 1, recent), (sink, recent + 1), (sink - 1, recent), (sink, recent - 1)):
        other = chunked_lambda(q, k, v, 0, seq_len, sink=s, recent=r, scale=scale)
        diff = (other - base).abs().max().item()
        assert diff > 1e-3, f"sink {s} recent {r} gives the same output as sink {sink} recent {recent}"
    causal = sdpa_causal(q, k, v, scale)
    assert (causal - base).abs().max().item() > 1e-2, "streaming output equals causal attention"
    # the first sink + recent rows see every earlier key, so they equal causal attention
    check_close(base[: sink + recent], causal[: sink + recent], torch.float32,
                "rows before the window starts sliding vs causal")


def test_output_dtype_and_shape_follow_query():
    q, k, v = make_qkv(19, 8, 2, 64, torch.bfloat16, seed=0)
    pos = torch.arange(19)
    out = lambda_attention(q, k, v, pos, pos, sink=2, recent=4, scale=0.125)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------- (d) streaming == causal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_streaming_is_causal_when_window_covers_sequence(num_q_heads, num_kv_heads, head_dim, seq_len, dtype):
    q, k, v = make_qkv(seq_len, num_q_heads, num_kv_heads, head_dim, dtype, seed=6)
    scale = head_dim**-0.5
    want = sdpa_causal(q, k, v, scale)
    pos = torch.arange(seq_len)
    causal_mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    # chunks that each gather (nearly) all keys are costly for long sequences: one chunk there
    mode = "random" if seq_len <= 99 else "whole"
    for sink, recent in ((1, seq_len), (seq_len, 1), (seq_len // 2 + 1, seq_len - seq_len // 2)):
        assert sink + recent >= seq_len
        vis = lambda_visible(pos, pos, sink=sink, recent=recent)
        assert torch.equal(vis, causal_mask), (
            f"sink {sink} + recent {recent} >= {seq_len} but the Λ mask is not the causal mask"
        )
        got = chunked_lambda(q, k, v, 0, seq_len, sink=sink, recent=recent, scale=scale,
                             mode=mode, seed=seq_len)
        check_close(got, want, dtype, f"streaming (sink {sink}, recent {recent}) vs causal SDPA, "
                    f"S={seq_len} Hq={num_q_heads} Hk={num_kv_heads} D={head_dim}")
