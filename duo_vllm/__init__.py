"""duo-vllm: DuoAttention (retrieval + streaming KV heads) for vLLM 0.32.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process
(CLI, engine core, workers). It must stay cheap and re-entrant: nothing here imports torch or the
backend until vLLM asks for it.
"""

from __future__ import annotations

BACKEND_NAME = "DUO"
BACKEND_CLASS_PATH = "duo_vllm.backend.DuoAttentionBackend"

_registered = False


def register() -> None:
    """Register the DUO attention backend and the vLLM patches it needs (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_CLASS_PATH)

    from duo_vllm.patches import apply_all

    apply_all()


__all__ = ["BACKEND_NAME", "BACKEND_CLASS_PATH", "register"]
