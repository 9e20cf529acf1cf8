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
else:
    raise RuntimeError(
        f"The DUO attention backend supports the CPU platform in this release; "
        f"this machine's vLLM platform is {current_platform.device_name!r}."
    )

__all__ = ["DuoAttentionBackend", "DuoAttentionImpl", "DuoAttentionMetadata", "DuoAttentionMetadataBuilder"]
