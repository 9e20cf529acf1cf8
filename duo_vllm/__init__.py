"""duo-vllm: DuoAttention (retrieval + streaming KV heads) for vLLM 0.32-0.34.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process
(CLI, engine core, workers), with no error handling around it. It must stay cheap, re-entrant
and never raise: :mod:`duo_vllm.vllm_support` decides whether this vLLM is served, and stands
aside with one warning when it is not. Nothing here imports torch or the backend until vLLM asks
for it.
"""

from __future__ import annotations

BACKEND_NAME = "DUO"
BACKEND_CLASS_PATH = "duo_vllm.backend.DuoAttentionBackend"

_registered = False


def register() -> None:
    """Register the DUO attention backend and the vLLM patches it needs, or stand aside
    (idempotent; never raises)."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from duo_vllm.vllm_support import install

        install(_register_backend, _apply_patches, _stand_in)
    except Exception as exc:  # noqa: BLE001 - the last guard between DUO and every vLLM process
        import logging

        logging.getLogger("vllm.duo_vllm").warning(
            "duo-vllm could not load (%s: %s); vLLM runs without the DUO backend.", type(exc).__name__, exc)


def _register_backend(class_path: str) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME in AttentionBackendEnum.__members__:
        register_backend(AttentionBackendEnum[BACKEND_NAME], class_path)
    else:
        register_backend(BACKEND_NAME, class_path)


def _stand_in() -> None:
    from duo_vllm.unavailable import stand_in

    stand_in(_register_backend)


def _apply_patches() -> None:
    from duo_vllm.patches import apply_all

    apply_all()


__all__ = ["BACKEND_NAME", "BACKEND_CLASS_PATH", "register"]
