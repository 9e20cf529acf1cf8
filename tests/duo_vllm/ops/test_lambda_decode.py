"""The batched decode form of the Λ pass against the per-request one (duo_vllm.ops)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duo_vllm.ops.lambda_attention import (
    lambda_attention,
    lambda_decode_attention,
    lambda_decode_positions,
    lambda_key_positions,
)


@settings(max_examples=200, deadline=None)
@given(sink=st.integers(1, 40), recent=st.integers(1, 80), length=st.integers(1, 300))
def test_decode_positions_are_the_lambda_keys(sink, recent, length):
    positions, valid = lambda_decode_positions(torch.tensor([length]), sink=sink, recent=recent)
    assert positions.shape == (1, sink + recent)
    want = lambda_key_positions(length - 1, length, sink=sink, recent=recent)
    assert positions[0][valid[0]].tolist() == want.tolist()
    assert int(positions.min()) >= 0 and int(positions.max()) < length


@settings(max_examples=60, deadline=None)
@given(sink=st.integers(1, 12), recent=st.integers(1, 24),
       lengths=st.lists(st.integers(1, 80), min_size=1, max_size=5),
       heads=st.sampled_from([(2, 1), (4, 2), (3, 3)]), seed=st.integers(0, 1000))
def test_batched_decode_equals_per_request_attention(sink, recent, lengths, heads, seed):
    gen = torch.Generator().manual_seed(seed)
    num_q, num_kv, head_size = heads[0], heads[1], 16
    lens = torch.tensor(lengths)
    positions, valid = lambda_decode_positions(lens, sink=sink, recent=recent)
    all_keys = [torch.randn(n, num_kv, head_size, generator=gen) for n in lengths]
    all_values = [torch.randn(n, num_kv, head_size, generator=gen) for n in lengths]
    query = torch.randn(len(lengths), num_q, head_size, generator=gen)
    # what a gather from storage returns: the key at each (clamped) position, padding included
    keys = torch.stack([k[p] for k, p in zip(all_keys, positions)])
    values = torch.stack([v[p] for v, p in zip(all_values, positions)])
    got = lambda_decode_attention(query, keys, values, valid, scale=0.25)
    for r, n in enumerate(lengths):
        k_pos = lambda_key_positions(n - 1, n, sink=sink, recent=recent)
        want = lambda_attention(query[r : r + 1], all_keys[r][k_pos], all_values[r][k_pos],
                                torch.tensor([n - 1]), k_pos, sink=sink, recent=recent, scale=0.25)
        torch.testing.assert_close(got[r : r + 1], want, atol=1e-5, rtol=1e-5)
