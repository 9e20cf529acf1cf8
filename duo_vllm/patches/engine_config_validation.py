"""Check DUO options and the pattern in the front-end process, before any engine starts.

Why: the DUO backend resolves its pattern when the first attention layer is built, inside the
engine-core process; an error there reaches the user as a long traceback ending in "Engine core
initialization failed". Resolving it as soon as the ``VllmConfig`` exists turns every bad option,
missing or malformed pattern, pattern for another model, or KV-cache dtype DUO cannot serve
(``duo_vllm.kv_quant``) into one ``ValueError`` raised by ``LLM(...)`` / ``vllm serve`` itself, in a second instead of after
process start-up.
How: wrap ``EngineArgs.create_engine_config``; when the config selects DUO, build the DUO runtime
once (it is cached by config hash, so the engine core's later lookup is the same one), log its KV
layout, and publish DUO's figures on this process's /metrics (``duo_vllm.metrics``: the API
server's process).
Remove when vLLM offers backends a hook to validate their configuration in the front-end.
"""

from __future__ import annotations

from duo_vllm.patches.wrapping import wrap_function


def when_duo_is_selected(check) -> None:
    """Wrap ``EngineArgs.create_engine_config`` to call ``check(config)`` on every config that
    selects the DUO backend (the one front-end hook DUO has, whether it serves or stands aside)."""
    from vllm.engine.arg_utils import EngineArgs

    def wrap(original):
        def create_engine_config(self, *args, **kwargs):
            config = original(self, *args, **kwargs)
            backend = config.attention_config.backend
            from duo_vllm import BACKEND_NAME

            if backend is not None and backend.name == BACKEND_NAME:
                check(config)
            return config

        return create_engine_config

    wrap_function(EngineArgs, "create_engine_config", wrap)


def _resolve_runtime(config) -> None:
    from duo_vllm.head_order import checkpoint_order_reason
    from duo_vllm.kv_quant import kv_cache_dtype_error
    from duo_vllm.runtime import record_plan_digest, runtime_from_vllm_config
    from duo_vllm.vllm_support import platform_name

    dtype_error = kv_cache_dtype_error(config.cache_config.cache_dtype, platform_name(), config.model_config.dtype)
    if dtype_error:
        raise ValueError(dtype_error)
    kernels = None
    if platform_name() == "cuda":
        from duo_vllm.backends.capabilities import check_cuda_kernels
        from duo_vllm.runtime import logger

        kernels = check_cuda_kernels(config)
        if kernels is not None:
            logger.info(kernels.line())
    runtime = runtime_from_vllm_config(config)
    if kernels is not None:
        from duo_vllm.backends.capabilities import check_head_slots

        check_head_slots(kernels, runtime)
    record_plan_digest(config, runtime)
    checkpoint_order_reason(config, runtime)
    from duo_vllm import metrics

    metrics.publish(runtime, _logged_kv_report(config, runtime))


def _logged_kv_report(config, runtime):
    """The KV layout line of the start-up log (computed once, here, and also what /metrics shows);
    None where it cannot be computed, which must not stop a server that can serve."""
    from duo_vllm.kv_cache.report import kv_report
    from duo_vllm.runtime import logger

    if not config.cache_config.block_size:
        return None
    try:
        report = kv_report(config, runtime=runtime)
    except Exception as exc:  # noqa: BLE001
        logger.warning("DUO KV figures not computed (%s: %s)", type(exc).__name__, exc)
        return None
    logger.info(report.line())
    return report


def apply() -> None:
    when_duo_is_selected(_resolve_runtime)
