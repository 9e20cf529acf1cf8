"""The FA3 split bound DUO's CUDA builder sets for layer groups with few retrieval heads.

FA3 chooses each decode request's split count on the GPU and clips it to the bound; the model
below follows ``flash_prepare_scheduler.cu`` (vllm-project/flash-attention, the FA3 vLLM 0.32
ships), in float32 as the kernel computes it. The bound must never clip that choice (or SMs idle
on layers of few heads) and must stay at vLLM's default where the default does not clip (FA3
sizes its combine step by it).
"""

from __future__ import annotations

import numpy as np
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
