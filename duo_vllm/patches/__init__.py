"""Every patch of vLLM 0.32 that duo-vllm needs, in one place.

Each module here changes one thing, says why, how, and when it can go, and is idempotent:
``apply_all()`` runs in every process through the plugin entry point.
"""

from __future__ import annotations

_applied = False


def apply_all() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    from duo_vllm.patches import (
        backend_enum_pickle,
        cpu_platform_backend,
        cpu_seeded_sampling,
        engine_config_validation,
        head_reorder_on_load,
        kv_cache_layout,
    )

    backend_enum_pickle.apply()
    cpu_platform_backend.apply()
    cpu_seeded_sampling.apply()
    engine_config_validation.apply()
    head_reorder_on_load.apply()
    kv_cache_layout.apply()
