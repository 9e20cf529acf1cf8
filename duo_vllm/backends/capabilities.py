"""What DUO runs on an NVIDIA card: GPU generation x vLLM backend (FlashAttention version) x
KV-cache dtype.

DUO's retrieval heads run through one of vLLM's CUDA backends, chosen as vLLM chooses for the card
(FLASHINFER first on Blackwell, FLASH_ATTN first elsewhere) or forced with the DUO option
``"kernel"``: FLASH_ATTN runs the FlashAttention version it chose for the card (FA3 on Hopper, FA4 on
Blackwell, FA2 elsewhere, or the version forced with ``--attention-config '{"flash_attn_version":
N}'``), FLASHINFER its own kernels. The streaming heads run DUO's Triton kernels either way. Each
combination is decided here, once, at start-up, from values the platform gives, so a card or
kernel DUO has not run on stops with one message naming what does run, never with a kernel error
in a request. ``tests/duo_vllm/backends/test_capabilities.py`` fakes the platform's answers;
``docs/backend.md`` prints the table.
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
    backend: str = "flash_attn"  # vLLM's backend under the retrieval heads (duo_vllm.config.KERNELS)

    def line(self) -> str:
        major, minor = self.capability
        return (f"DUO on compute capability {major}.{minor}, KV cache {self.kv_cache_dtype}: retrieval heads "
                f"{self.retrieval}, streaming heads {self.streaming} ({self.measured})")


STREAMING = "Triton Λ kernels"
# FLASHINFER's page sizes off Blackwell's trtllm-gen path; DUO's block-outermost cache layout
# cannot split a larger block into kernel blocks.
FLASHINFER_BLOCK_SIZES = (16, 32, 64)
# FLASHINFER's head sizes (FlashInferBackend.get_supported_head_sizes in vLLM 0.32-0.34).
FLASHINFER_HEAD_SIZES = (64, 128, 256, 512)
FORCE_FLASH_ATTN = """--additional-config '{"duo": {..., "kernel": "flash_attn"}}'"""
FORCE_FLASHINFER = """--additional-config '{"duo": {..., "kernel": "flashinfer"}}'"""


def selected_backend(kernel_option: str, capability: tuple[int, int], flashinfer_available: bool = True) -> str:
    """The backend DUO's retrieval heads run through: the option's, or for ``"auto"`` vLLM's own
    first choice for the card (``vllm/platforms/cuda.py``: FLASHINFER on compute capability 10.x
    where FlashInfer can run, FLASH_ATTN elsewhere, as vLLM falls back when FLASHINFER cannot)."""
    if kernel_option != "auto":
        return kernel_option
    return "flashinfer" if int(capability[0]) == 10 and flashinfer_available else "flash_attn"


def flashinfer_usable() -> bool:
    """vLLM's own answer (``vllm.utils.flashinfer.has_flashinfer``): the ``flashinfer`` package, and
    flashinfer-cubin or nvcc + ninja for its JIT. DUO picks its retrieval backend itself, so vLLM's
    selector never asks this for a DUO engine: without it a missing toolchain would fail at the
    first FlashInfer call, in a request."""
    try:
        from vllm.utils.flashinfer import has_flashinfer
    except ImportError:
        return False
    return bool(has_flashinfer())


def flashinfer_kernels(capability: tuple[int, int], kv_cache_dtype: str, block_size: int | None,
                       head_size: int | None = None, available: bool = True) -> CudaKernels:
    """The FLASHINFER row: vLLM's FlashInfer backend runs compute capability 8.0 to 12.1."""
    major, minor = capability
    if not available:
        raise DuoConfigError(
            "DUO's retrieval heads are set to vLLM's FLASHINFER backend, which cannot run here: the flashinfer "
            "package is missing, or it has neither flashinfer-cubin nor nvcc and ninja to compile its kernels. "
            f"Install flashinfer-python with flashinfer-cubin (or a CUDA toolkit and ninja), or use {FORCE_FLASH_ATTN}.")
    if not (8, 0) <= capability <= (12, 1):
        raise DuoConfigError(
            f"vLLM's FLASHINFER backend runs compute capability 8.0 to 12.1; this GPU is {major}.{minor}. "
            f"Run DUO's retrieval heads on FLASH_ATTN with {FORCE_FLASH_ATTN}.")
    if head_size is not None and head_size not in FLASHINFER_HEAD_SIZES:
        raise DuoConfigError(
            f"vLLM's FLASHINFER backend takes head sizes 64, 128, 256 and 512; this model's is {head_size}. "
            f"Run DUO's retrieval heads on FLASH_ATTN with {FORCE_FLASH_ATTN}.")
    if block_size is not None and block_size not in FLASHINFER_BLOCK_SIZES:
        raise DuoConfigError(
            f"DUO on FLASHINFER takes --block-size 16, 32 or 64 (FlashInfer's page sizes; DUO's cache layout "
            f"cannot split larger blocks), got {block_size}. Change --block-size or use {FORCE_FLASH_ATTN}.")
    fp8 = kv_cache_dtype in FP8_DTYPES
    return CudaKernels(capability, kv_cache_dtype, "FlashInfer (FLASHINFER)" + (", FP8" if fp8 else ""),
                       STREAMING, "not yet run on a GPU", backend="flashinfer")


def cuda_kernels(capability: tuple[int, int], flash_attn_version: int | None, kv_cache_dtype: str,
                 backend: str = "flash_attn", block_size: int | None = None, head_size: int | None = None,
                 flashinfer_available: bool = True) -> CudaKernels:
    """The kernels DUO runs for this card (``capability``: (major, minor)), retrieval backend
    (``selected_backend``), FlashAttention version (FLASH_ATTN's choice for the layer; unused on
    FLASHINFER) and KV-cache dtype; raises ``DuoConfigError`` naming what would run where it cannot."""
    major, minor = capability = (int(capability[0]), int(capability[1]))
    card = f"compute capability {major}.{minor}"
    fp8 = kv_cache_dtype in FP8_DTYPES
    if major < 8:
        raise DuoConfigError(
            f"DUO needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Hopper, Blackwell); "
            f"this one is {card}. Serve it without --attention-backend DUO.")
    if backend == "flashinfer":
        return flashinfer_kernels(capability, kv_cache_dtype, block_size, head_size, flashinfer_available)
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
        + (" and --kv-cache-dtype auto" if fp8 else "")
        + f", run the retrieval heads on FLASHINFER with {FORCE_FLASHINFER}, or serve without --attention-backend DUO.")


def kernel_option(vllm_config) -> str:
    """The DUO option ``"kernel"`` of an engine's config (``"auto"`` where it gives none)."""
    from duo_vllm.config import DuoConfig

    return DuoConfig.from_additional_config(vllm_config.additional_config).kernel


def engine_backend(vllm_config) -> str:
    """The backend this engine's DUO layers run their retrieval heads through (``duo_vllm.backend``
    hands vLLM that backend's classes); ``vllm_config`` None: the card's default."""
    from vllm.platforms import current_platform

    option = kernel_option(vllm_config) if vllm_config is not None else "auto"
    capability = current_platform.get_device_capability()
    if capability is None:
        return "flash_attn" if option == "auto" else option
    card = (capability.major, capability.minor)
    # asked only where the answer decides (vLLM's has_flashinfer warns when FlashInfer cannot run)
    return selected_backend(option, card, flashinfer_usable() if option == "auto" and card[0] == 10 else True)


def check_cuda_kernels(vllm_config) -> CudaKernels | None:
    """The front-end's check of this engine's card and retrieval backend (None where the platform
    cannot say: no GPU visible to this process; the engine then decides as stock does)."""
    from vllm.config import set_current_vllm_config
    from vllm.platforms import current_platform

    capability = current_platform.get_device_capability()
    if capability is None:
        return None
    if engine_backend(vllm_config) == "flashinfer":
        cache = vllm_config.cache_config
        return cuda_kernels((capability.major, capability.minor), None, cache.cache_dtype, "flashinfer",
                            cache.block_size, vllm_config.model_config.get_head_size(), flashinfer_usable())
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


def check_head_slots(kernels: CudaKernels | None, runtime) -> None:
    """FLASHINFER plans each layer group for the head count of its cache spec, which under
    tensor parallelism is the largest over ranks (``DuoRuntime.head_slots``): a rank with fewer
    retrieval heads in a layer would run fewer heads than were planned. Refused until measured."""
    if kernels is None or kernels.backend != "flashinfer":
        return
    padding = runtime.head_slots.padding
    if padding:
        raise DuoConfigError(
            f"DUO on FLASHINFER needs every tensor-parallel rank to hold as many retrieval heads in each layer "
            f"as the others; this pattern leaves {padding} head slots of padding at TP {runtime.tp_size}. "
            f"Use {FORCE_FLASH_ATTN}.")
