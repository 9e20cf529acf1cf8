"""The CUDA backend on CPU: the FA3 split bound its builder sets for layer groups with few
retrieval heads, and its streaming pass (TritonStreaming) in Triton's interpreter.

FA3 chooses each decode request's split count on the GPU and clips it to the bound; the model
below follows ``flash_prepare_scheduler.cu`` (vllm-project/flash-attention, the FA3 vLLM 0.32
ships), in float32 as the kernel computes it. The bound must never clip that choice (or SMs idle
on layers of few heads) and must stay at vLLM's default where the default does not clip (FA3
sizes its combine step by it).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duo_vllm.backends.cuda import MAX_FA3_SPLITS, fa3_decode_split_bound

VLLM_DEFAULT = 32  # AttentionConfig.flash_attn_max_num_splits_for_cuda_graph


def fa3_decode_splits(n_blocks: list[int], heads: int, num_sms: int, bound: int) -> list[int]:
    """Split count FA3 gives each request of a decode batch (one query each: one m-block)."""
    total = np.float32(sum(n_blocks))
    blocks_per_sm = max(1, int(np.ceil(total * np.float32(1.1) * np.float32(heads) / np.float32(num_sms))))
    return [max(min(-(-n // blocks_per_sm), bound), 1) for n in n_blocks]


@settings(max_examples=400, deadline=None)
@given(num_sms=st.integers(8, 264), heads=st.integers(1, 128),
       n_blocks=st.lists(st.integers(0, 1 << 16), min_size=1, max_size=64))
def test_bound_never_clips_fa3s_choice(num_sms, heads, n_blocks):
    bound = fa3_decode_split_bound(num_sms, heads, VLLM_DEFAULT)
    unclipped = fa3_decode_splits(n_blocks, heads, num_sms, bound=1 << 30)
    assert fa3_decode_splits(n_blocks, heads, num_sms, bound) == [min(s, MAX_FA3_SPLITS) for s in unclipped]


def test_bound_stays_at_the_default_where_the_default_does_not_clip():
    # H100 / H200: 132 SMs. From 4 heads up FA3 never asks for more than 32 splits.
    for heads in (4, 8, 16, 32):
        assert fa3_decode_split_bound(132, heads, VLLM_DEFAULT) == VLLM_DEFAULT
        assert max(fa3_decode_splits([n], heads, 132, 1 << 30)[0] for n in range(1, 1 << 14)) <= VLLM_DEFAULT


def test_bound_rises_for_few_heads_where_the_default_clips():
    # 2 heads at 128K keys (1024 blocks of 128): FA3 wants 57 splits; the default would give 32.
    assert fa3_decode_splits([1024], 2, 132, 1 << 30) == [57]
    assert fa3_decode_splits([1024], 2, 132, VLLM_DEFAULT) == [32]
    assert fa3_decode_split_bound(132, 2, VLLM_DEFAULT) >= 57
    assert fa3_decode_split_bound(132, 1, VLLM_DEFAULT) == 121  # ceil(132 / 1.1) + 1
    assert fa3_decode_split_bound(16, 1, VLLM_DEFAULT) == VLLM_DEFAULT


def test_a_larger_user_bound_is_kept():
    assert fa3_decode_split_bound(132, 8, 64) == 64
    assert fa3_decode_split_bound(132, 1, 256) == MAX_FA3_SPLITS


# ---- the streaming pass the CUDA Impl holds, run in Triton's CPU interpreter --------------------

def _e4m3_exact(shape, gen, scale):
    """Values that are e4m3 codes times a power-of-two scale (about 0.1 to 2 in magnitude), so an
    FP8 store is exact on the GPU and in the interpreter alike; the codes come back too."""
    codes = torch.randint(0x28, 0x41, shape, generator=gen, dtype=torch.uint8)
    codes |= (torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8) << 7)
    return codes.view(torch.float8_e4m3fn).float() * scale, codes


@pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_triton_streaming_write_and_forward_match_reference(kv_cache_dtype):
    """TritonStreaming.write then .forward, as the Impl calls them, over two steps of one batch
    (a mixed step: decode, first chunk, later chunk, CUDA-graph padding; then a decode step),
    against the dense DuoAttention of duo_vllm.reference. Retrieval KV heads land in their own
    cache (exactly, FP8 codes included) and their output heads are left alone."""
    from duo_vllm.backends.cuda import TritonStreaming
    from duo_vllm.backends.head_plan import HeadPlan
    from duo_vllm.reference import duo_attention

    sink, recent, page, head_dim, group = 2, 6, 4, 16, 2
    retrieval_kv = torch.tensor([False, True, False])  # KV head 1 keeps full attention
    num_kv, num_q = retrieval_kv.numel(), retrieval_kv.numel() * group
    kv_heads = torch.arange(num_kv)

    def q_of(kv):
        return (kv[:, None] * group + torch.arange(group)).flatten()

    plan = HeadPlan(0, retrieval_kv, kv_heads[~retrieval_kv], q_of(kv_heads[~retrieval_kv]),
                    kv_heads[retrieval_kv], q_of(kv_heads[retrieval_kv]))
    scale = head_dim ** -0.5
    streaming = TritonStreaming(num_heads=num_q, head_size=head_dim, scale=scale, kv_cache_dtype=kv_cache_dtype,
                                sink=sink, recent=recent)
    fp8 = kv_cache_dtype == "fp8"
    assert streaming.fp8 == (torch.float8_e4m3fn if fp8 else None)
    layer = SimpleNamespace(_q_scale=torch.tensor([1.0]), _k_scale=torch.tensor([0.5 if fp8 else 1.0]),
                            _v_scale=torch.tensor([2.0 if fp8 else 1.0]))

    gen = torch.Generator().manual_seed(0)
    final_lens = [23, 10, 31, 0]  # the last request is CUDA-graph padding (no query, length 0)
    k_all, k_codes = _e4m3_exact((sum(final_lens), num_kv, head_dim), gen, layer._k_scale)
    v_all, v_codes = _e4m3_exact((sum(final_lens), num_kv, head_dim), gen, layer._v_scale)
    starts = [sum(final_lens[:r]) for r in range(len(final_lens))]
    blocks_per_req = max(-(-n // page) for n in final_lens)
    # pages in shuffled order; vLLM allocates an FP8 cache as bytes
    order = torch.randperm(len(final_lens) * blocks_per_req, generator=gen)
    block_table = (order.view(len(final_lens), blocks_per_req) + 1).to(torch.int32)
    cache_dtype = torch.uint8 if fp8 else torch.float32
    retrieval_cache = torch.zeros(block_table.numel() + 1, 1, page, 2 * head_dim, dtype=cache_dtype)
    streaming_cache = torch.zeros(block_table.numel() + 1, 2, page, 2 * head_dim, dtype=cache_dtype)

    # (seq_len, q_len) per request and step: decode, first chunk, later chunk after a context, padding
    steps = [[(22, 1), (9, 9), (30, 12), (0, 0)], [(23, 1), (10, 1), (31, 1), (0, 0)]]
    # the contexts of the first step were written by earlier steps
    steps_with_context = [[(n - q, n - q) for n, q in steps[0]]] + steps
    for step, requests in enumerate(steps_with_context):
        rows = [starts[r] + p for r, (n, q) in enumerate(requests) for p in range(n - q, n)]
        slots = torch.tensor([int(block_table[r, p // page]) * page + p % page
                              for r, (n, q) in enumerate(requests) for p in range(n - q, n)] + [-1])
        key, value = k_all[rows + [0]], v_all[rows + [0]]  # one padding token (slot -1) at the end
        streaming.write(layer, plan, key, value, retrieval_cache, slots, streaming_cache, slots)
        if step == 0:
            continue  # context only
        q_lens = [q for _, q in requests]
        query = torch.randn(sum(q_lens) + 1, num_q, head_dim, generator=gen)  # + one padded row
        out_heads = torch.full((sum(q_lens), num_q, head_dim), 7.0)
        metadata = SimpleNamespace(
            block_table=block_table, seq_lens=torch.tensor([n for n, _ in requests], dtype=torch.int32),
            query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
            max_query_len=max(q_lens))
        streaming.forward(layer, plan, query.view(query.shape[0], -1), out_heads, streaming_cache, metadata)

        assert bool((out_heads[:, plan.retrieval_q_heads] == 7.0).all()), "a retrieval head was written"
        begin = 0
        for r, (n, q) in enumerate(requests):
            if q == 0:
                continue
            seq = slice(starts[r], starts[r] + n)
            want = duo_attention(query[begin:begin + q], k_all[seq], v_all[seq], torch.zeros(num_q, dtype=torch.bool),
                                 sink=sink, recent=recent, scale=scale)
            torch.testing.assert_close(out_heads[begin:begin + q, plan.streaming_q_heads],
                                       want[:, plan.streaming_q_heads], atol=2e-5, rtol=2e-5,
                                       msg=lambda m, r=r, step=step: f"TritonStreaming, step {step}, request {r}: {m}")
            begin += q

    # every position of every request, in both caches, as the kernels store it
    for r, n in enumerate(final_lens):
        for p in range(n):
            block, offset, t = int(block_table[r, p // page]), p % page, starts[r] + p
            for cache, heads in ((retrieval_cache, plan.retrieval_kv_heads), (streaming_cache, plan.streaming_kv_heads)):
                stored = cache[block, :, offset]
                if fp8:
                    want = torch.cat([k_codes[t, heads], v_codes[t, heads]], -1)
                else:
                    want = torch.cat([k_all[t, heads], v_all[t, heads]], -1)
                assert torch.equal(stored, want), f"request {r} position {p}"


def test_retrieval_kernels_are_built_under_the_engines_config(monkeypatch):
    """vLLM runs layers without a current config, and FLASH_ATTN reads the FlashAttention version
    (``flash_attn_version``) from it at construction: the retrieval kernels, built at the first
    forward, must see the config their layer was built under, or a forced FA2 would run FA3 on
    Hopper. FLASH_ATTN's impl is replaced by a recorder: vLLM's needs its CUDA kernels to build."""
    from vllm.config import (
        VllmConfig,
        get_current_vllm_config_or_none,
        set_current_vllm_config,
    )

    from duo_vllm.backends import cuda

    seen = []

    class Recorder:
        def __init__(self, num_heads, head_size, scale, num_kv_heads, *args):
            seen.append((num_heads, num_kv_heads, get_current_vllm_config_or_none()))

    monkeypatch.setattr(cuda, "FlashAttentionImpl", Recorder)
    engine_config = VllmConfig()
    impl = object.__new__(cuda.DuoAttentionImpl)
    impl.head_size, impl.scale, impl.kv_cache_dtype, impl.attn_type = 64, 0.125, "auto", "decoder"
    impl._retrieval_kernels = {}
    with set_current_vllm_config(engine_config):  # as while vLLM builds the layer
        impl._engine_config = get_current_vllm_config_or_none()
    assert get_current_vllm_config_or_none() is None  # as while vLLM runs it
    first = impl.retrieval_kernel(8, 2)
    assert impl.retrieval_kernel(8, 2) is first  # built once per head count
    impl.retrieval_kernel(4, 1)
    assert [(q, kv) for q, kv, _ in seen] == [(8, 2), (4, 1)]
    assert all(config is engine_config for _, _, config in seen)
    assert get_current_vllm_config_or_none() is None  # and nothing is left set
