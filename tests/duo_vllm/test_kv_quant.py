"""FP8 KV caches under DUO (duo_vllm.kv_quant): which dtypes each platform serves, and that the
streaming heads' FP8 storage rounds exactly as the platform's own cache write does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duo_vllm.kv_quant import (
    SUPPORTED_KV_CACHE_DTYPES,
    Fp8KV,
    dequantize_fp8,
    kv_cache_dtype_error,
    quantize_fp8,
    round_through_fp8,
)
from duo_vllm.streaming_store import StreamingKV

FORMATS = [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]


def _cpu_cache_write(values: torch.Tensor, kv_cache_dtype: str, scale: float) -> torch.Tensor:
    """uint8 codes vLLM-CPU's cache write stores for ``values`` [T, D] (one head), read from the
    value half of the cache, whose layout is plain [block, head, slot, D] on the ``vec`` ISA."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    num_tokens, head_dim = values.shape
    block = 32
    blocks = -(-num_tokens // block)
    cache = torch.zeros(blocks, 1, 2 * block, head_dim, dtype=torch.uint8)
    key_cache, value_cache = cache.chunk(2, dim=2)
    isa = _get_attn_isa(torch.float32, block, head_dim, kv_cache_dtype)
    assert isa == "vec"
    ops.cpu_attn_reshape_and_cache(values[:, None], values[:, None], key_cache, value_cache,
                                   torch.arange(num_tokens), isa, k_scale=scale, v_scale=scale,
                                   kv_cache_dtype=kv_cache_dtype)
    return value_cache[:, 0].reshape(-1, head_dim)[:num_tokens]


@pytest.mark.parametrize("scale", [1.0, 0.37, 5.0])
@pytest.mark.parametrize("kv_cache_dtype,dtype", FORMATS)
def test_toward_zero_rounding_is_vllm_cpus_cache_write(kv_cache_dtype, dtype, scale):
    """The rounding DUO's CPU streaming store uses, against the real op CPU_ATTN's cache uses:
    equal bytes over 7 decades (subnormals, normals, saturation)."""
    pytest.importorskip("vllm._C", reason="vLLM's CPU build")
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        pytest.skip("vLLM-CPU's FP8 KV cache needs x86 with AVX-512 or AMX")
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(96, 64, generator=gen) * torch.logspace(-4, 3, 64)
    assert torch.equal(_cpu_cache_write(values, kv_cache_dtype, scale),
                       quantize_fp8(values, scale, dtype, toward_zero=True))
    # and nearest rounding is not what it does: the test tells the two apart
    assert not torch.equal(_cpu_cache_write(values, kv_cache_dtype, scale), quantize_fp8(values, scale, dtype))


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(x=st.lists(finite, min_size=1, max_size=64), scale=st.floats(1e-3, 1e3),
       fmt=st.sampled_from([d for _, d in FORMATS]))
def test_fp8_rounding_properties(x, scale, fmt):
    values = torch.tensor(x, dtype=torch.float32)
    limit = torch.finfo(fmt).max
    y = (values / scale).clamp(-limit, limit)
    nearest = dequantize_fp8(quantize_fp8(values, scale, fmt), 1.0, fmt)
    toward = dequantize_fp8(quantize_fp8(values, scale, fmt, toward_zero=True), 1.0, fmt)
    assert bool(torch.isfinite(nearest).all() and torch.isfinite(toward).all())  # saturated, never inf/NaN
    assert bool((toward.abs() <= y.abs()).all()), "toward zero never grows a magnitude"
    assert bool(((toward == 0) | (torch.sign(toward) == torch.sign(y))).all())
    # toward zero is the nearest value or the code next to it, on the zero side
    assert bool(((toward == nearest) | (toward.abs() < nearest.abs())).all())
    # nothing representable lies strictly between y and its toward-zero rounding
    step_up = dequantize_fp8(quantize_fp8(values, scale, fmt, toward_zero=True) + 1, 1.0, fmt)
    below_limit = toward.abs() < limit
    assert bool(((step_up.abs() > y.abs()) | ~below_limit | (toward.abs() == y.abs())).all())


def test_round_through_fp8_keeps_dtype_and_applies_the_scale():
    x = torch.tensor([0.3, -7.0, 1000.0], dtype=torch.bfloat16)
    out = round_through_fp8(x, 2.0, torch.float8_e4m3fn)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [0.3125, -7.0, 896.0]  # 0.15 -> 0.15625 (x2); 500 saturates at 448 (x2)


@pytest.mark.parametrize("toward_zero", [False, True])
def test_streaming_store_writes_codes_and_gathers_dequantized(toward_zero):
    gen = torch.Generator().manual_seed(4)
    head_dim, heads = 16, 2
    cache = torch.zeros(4, heads + 1, 8, 2 * head_dim, dtype=torch.uint8)
    fp8 = Fp8KV(torch.float8_e4m3fn, 0.5, 3.0, toward_zero=toward_zero)
    store = StreamingKV(cache, head_dim, heads, fp8)
    key, value = torch.randn(5, heads, head_dim, generator=gen) * 40, torch.randn(5, heads, head_dim, generator=gen)
    slots = torch.tensor([9, 10, -1, 3, 31])
    store.write(key, value, slots)
    k, v = store.gather(torch.tensor([0, 1, 2, 3]), torch.tensor([9, 10, 3, 31]))
    kept = torch.tensor([0, 1, 3, 4])
    assert k.dtype == torch.float32
    assert torch.equal(k, round_through_fp8(key[kept], 0.5, torch.float8_e4m3fn, toward_zero=toward_zero))
    assert torch.equal(v, round_through_fp8(value[kept], 3.0, torch.float8_e4m3fn, toward_zero=toward_zero))
    assert int((cache[:, heads] != 0).sum()) == 0, "the padding head slot was written"


def test_platform_dtypes_and_messages():
    for platform, names in SUPPORTED_KV_CACHE_DTYPES.items():
        for name in names:
            assert kv_cache_dtype_error(name, platform) is None
    e5m2 = kv_cache_dtype_error("fp8_e5m2", "cuda")
    assert "e4m3" in e5m2 and "fp8, fp8_e4m3" in e5m2 and "FlashAttention 3" in e5m2
    other = kv_cache_dtype_error("turboquant_4bit_nc", "cpu")
    assert "--kv-cache-dtype turboquant_4bit_nc" in other and "auto, fp8, fp8_e4m3, fp8_e5m2" in other
    assert "model's dtype" in kv_cache_dtype_error("float16", "cuda", torch.bfloat16)
    assert kv_cache_dtype_error("bfloat16", "cuda", torch.bfloat16) is None
    assert kv_cache_dtype_error("fp8", "rocm") is None  # vllm_support stands DUO aside there
