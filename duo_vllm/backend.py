"""``AttentionBackendEnum.DUO`` points here: the DUO backend classes for the current platform."""

from __future__ import annotations

from vllm.platforms import current_platform

if current_platform.is_cpu():
    from duo_vllm.backends.cpu import (
        DuoAttentionBackend,
        DuoAttentionImpl,
        DuoAttentionMetadata,
        DuoAttentionMetadataBuilder,
    )
elif current_platform.is_cuda():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata as DuoAttentionMetadata

    from duo_vllm.backends.cuda import (
        DuoAttentionBackend,
        DuoAttentionImpl,
        DuoAttentionMetadataBuilder,
    )
else:
    raise RuntimeError(
        "The DUO attention backend runs on the CPU and CUDA platforms; this machine's vLLM "
        f"platform is {current_platform.device_name!r}."
    )

__all__ = ["DuoAttentionBackend", "DuoAttentionImpl", "DuoAttentionMetadata", "DuoAttentionMetadataBuilder"]
