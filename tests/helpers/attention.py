"""Shared pieces of the attention math tests: the case matrix, inputs, a causal SDPA reference
and the closeness check (kept out of collection, like FlashInfer's tests/test_helpers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

HEADS = [(4, 4), (8, 2), (9, 3), (5, 1)]  # (num_q_heads, num_kv_heads)
HEAD_DIMS = [64, 128]
SEQ_LENS = [1, 3, 19, 99, 577]
DTYPES = [torch.bfloat16, torch.float32]
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead (and contention on CI).

    Import it into a test module to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_qkv(seq_len, num_q_heads, num_kv_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq_len, num_q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
    return q, k, v


def sdpa_causal(query, key, value, scale, q_offset=None):
    """Causal attention via torch SDPA (fp32, GQA expanded) for queries at the last T positions
    (or from ``q_offset``); [T, Hq, D] in query.dtype."""
    num_tokens, seq_len = query.shape[0], key.shape[0]
    offset = seq_len - num_tokens if q_offset is None else q_offset
    group = query.shape[1] // key.shape[1]
    q = query.float().transpose(0, 1)[None]
    k = key.float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
    v = value.float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
    mask = torch.arange(seq_len)[None, :] <= (torch.arange(num_tokens)[:, None] + offset)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1).to(query.dtype)


def check_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}\n{m}")
