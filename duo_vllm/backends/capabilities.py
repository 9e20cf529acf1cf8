"""What DUO runs on an NVIDIA card: GPU generation x FlashAttention version x KV-cache dtype.

DUO's CUDA backend is vLLM's FLASH_ATTN: the retrieval heads run the FlashAttention version
FLASH_ATTN chose for the card (FA3 on Hopper, FA4 on Blackwell, FA2 elsewhere, or the version
forced with ``--attention-config '{"flash_attn_version": N}'``), the streaming heads DUO's Triton
kernels. Each combination is decided here, once, at start-up, from values the platform gives, so
a card or kernel DUO has not run on stops with one message naming what does run, never with a
kernel error in a request. ``tests/duo_vllm/backends/test_capabilities.py`` fakes the platform's
answers; ``docs/backend.md`` prints the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from duo_vllm.config import DuoConfigError

logger = logging.getLogger("vllm.duo_vllm")

FP8_DTYPES = ("fp8", "fp8_e4m3")
FORCE_FA2 = """--attention-config '{"flash_attn_version": 2}'"""


@dataclass(frozen=True)
class CudaKernels:
    capability: tuple[int, int]
    kv_cache_dtype: str
    retrieval: str  # the retrieval heads' kernel
    streaming: str  # the streaming heads' kernel
    measured: str  # where this combination has run (or "not yet measured")

    def line(self) -> str:
        major, minor = self.capability
        return (f"DUO on compute capability {major}.{minor}, KV cache {self.kv_cache_dtype}: retrieval heads "
                f"{self.retrieval}, streaming heads {self.streaming} ({self.measured})")


STREAMING = "Triton Λ kernels"


def cuda_kernels(capability: tuple[int, int], flash_attn_version: int | None, kv_cache_dtype: str) -> CudaKernels:
    """The kernels DUO runs for this card (``capability``: (major, minor)), FlashAttention
    version (FLASH_ATTN's choice for the layer) and KV-cache dtype; raises ``DuoConfigError``
    naming what would run where it cannot."""
    major, minor = capability = (int(capability[0]), int(capability[1]))
    card = f"compute capability {major}.{minor}"
    fp8 = kv_cache_dtype in FP8_DTYPES
    if major < 8:
        raise DuoConfigError(
            f"DUO needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Hopper, Blackwell); "
            f"this one is {card}. Serve it without --attention-backend DUO.")
    if flash_attn_version == 3:
        return CudaKernels(capability, kv_cache_dtype, "FlashAttention 3 (FLASH_ATTN)" + (", FP8" if fp8 else ""),
                           STREAMING, "measured on H100 and H200, vLLM 0.32 and 0.33")
    if flash_attn_version == 2:
        if fp8:
            raise DuoConfigError(
                f"--kv-cache-dtype {kv_cache_dtype} with DUO needs FlashAttention 3 (Hopper, compute capability "
                f"9.0); FLASH_ATTN runs FlashAttention 2 on {card} here. Serve with --kv-cache-dtype auto.")
        return CudaKernels(capability, kv_cache_dtype, "FlashAttention 2 (FLASH_ATTN)", STREAMING,
                           "greedy tokens checked against stock FA2 on H100, vLLM 0.33; speed not yet measured")
    raise DuoConfigError(
        f"FLASH_ATTN chose FlashAttention {flash_attn_version} on {card}, which DUO has not run; "
        f"force FlashAttention 2 with {FORCE_FA2}"
        + (" and --kv-cache-dtype auto" if fp8 else "") + ", or serve without --attention-backend DUO.")


def check_cuda_kernels(vllm_config) -> CudaKernels | None:
    """The front-end's check of this engine's card and FlashAttention version (None where the
    platform cannot say: no GPU visible to this process; the engine then decides as stock does)."""
    from vllm.config import set_current_vllm_config
    from vllm.platforms import current_platform

    capability = current_platform.get_device_capability()
    if capability is None:
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    except ImportError:  # a vLLM build without FLASH_ATTN: its own selection error follows
        return None
    model_config = vllm_config.model_config
    try:
        with set_current_vllm_config(vllm_config):  # FLASH_ATTN reads a forced version from it
            version = get_flash_attn_version(head_size=model_config.get_head_size())
    except Exception as exc:  # noqa: BLE001 - probing must never stop an engine that can start
        logger.debug("FlashAttention version not determined in the front-end: %s", exc)
        return None
    return cuda_kernels((capability.major, capability.minor), version, vllm_config.cache_config.cache_dtype)
