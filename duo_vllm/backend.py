"""``AttentionBackendEnum.DUO`` points here: the DUO backend classes for the current platform and,
on CUDA, for the vLLM backend the engine runs the retrieval heads through (DUO option ``"kernel"``,
decided in ``duo_vllm.backends.capabilities``)."""

from __future__ import annotations

from vllm.platforms import current_platform

__all__ = ["DuoAttentionBackend", "DuoAttentionImpl", "DuoAttentionMetadata", "DuoAttentionMetadataBuilder"]

if current_platform.is_cpu():
    from duo_vllm.backends.cpu import (
        DuoAttentionBackend,
        DuoAttentionImpl,
        DuoAttentionMetadata,
        DuoAttentionMetadataBuilder,
    )
elif current_platform.is_cuda():

    def cuda_classes(backend: str) -> dict[str, type]:
        """The four classes of DUO on vLLM's ``backend`` ("flash_attn" or "flashinfer")."""
        if backend == "flashinfer":
            from duo_vllm.backends import cuda_flashinfer as fi

            return dict(zip(__all__, (fi.DuoFlashInferBackend, fi.DuoFlashInferImpl, fi.FlashInferMetadata,
                                      fi.DuoFlashInferMetadataBuilder), strict=True))
        from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

        from duo_vllm.backends import cuda

        return dict(zip(__all__, (cuda.DuoAttentionBackend, cuda.DuoAttentionImpl, FlashAttentionMetadata,
                                  cuda.DuoAttentionMetadataBuilder), strict=True))

    def __getattr__(name: str) -> type:
        """Looked up afresh each time: vLLM resolves the backend by its path while it builds an
        engine's layers, under that engine's config, whose DUO options pick the backend."""
        if name not in __all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from vllm.config import get_current_vllm_config_or_none

        from duo_vllm.backends.capabilities import engine_backend

        return cuda_classes(engine_backend(get_current_vllm_config_or_none()))[name]

else:
    raise RuntimeError(
        "The DUO attention backend runs on the CPU and CUDA platforms; this machine's vLLM "
        f"platform is {current_platform.device_name!r}."
    )
