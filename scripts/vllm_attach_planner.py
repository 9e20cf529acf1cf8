"""Steps 6 and 7 of ``scripts/check_vllm_attach.py``: vLLM's own KV-cache planner, and on releases
with the extensible KV cache (0.34+) its resizing after warm-up, run on DUO-shaped specs with a
stub config, so both are checked on a machine without a GPU."""

from __future__ import annotations

import inspect
import traceback
from types import SimpleNamespace

from vllm_attach_report import first_line, header, record, shorten


# ---- (6) vLLM's planner on DUO-shaped specs ---------------------------------------------------

def _stub_config(block_size=16, max_model_len=4096, layout="BLHNC"):
    """A VllmConfig stand-in without a model: vLLM's own CacheConfig and ParallelConfig (the
    layout set as the engine core resolves it; block-outermost, as DUO's backends ask for) and
    the few model, scheduler and attention fields the planner reads."""
    import torch
    from vllm.config import CacheConfig, ParallelConfig

    cache_config = CacheConfig(block_size=block_size)
    cache_config.kv_cache_layout = layout
    return SimpleNamespace(
        max_in_flight_tokens=2048,
        num_prefill_lookahead_tokens=0,
        speculative_config=None,
        kv_transfer_config=None,
        cache_config=cache_config,
        parallel_config=ParallelConfig(),
        device_config=SimpleNamespace(device_type="cuda"),
        model_config=SimpleNamespace(max_model_len=max_model_len, original_max_model_len=max_model_len,
                                     dtype=torch.bfloat16, get_head_size=lambda: 128,
                                     supports_kv_cache_grouping=False, use_mla=False),
        scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False,
                                         max_num_batched_tokens=2048, max_num_seqs=16),
        attention_config=SimpleNamespace(hisparse_config=None, backend=None),
    )


def step_planner() -> None:
    header("6. vLLM's KV-cache planner on DUO-shaped specs (stub VllmConfig, no GPU)")
    try:
        _run_planner()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record("6", "planner run", False, first_line(exc), gating=False)


def _duo_specs(config):
    """The layer specs DUO reports for a small model; returns (specs, runtime)."""
    import numpy as np
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from duo_vllm.config import DuoConfig
    from duo_vllm.kv_cache.layers import COMPANION_SUFFIX, layer_spec, streaming_spec_for_layer
    from duo_vllm.runtime import DuoRuntime

    # 4 layers x 2 KV heads: mixed, mixed, all retrieval, all streaming.
    mask = np.array([[False, True], [True, False], [True, True], [False, False]])
    runtime = DuoRuntime(DuoConfig(sink=64, recent=256), pattern=None, sparsity=None,
                         retrieval_mask=mask, tp_size=1, tp_rank=0)
    specs = {}
    for layer in range(mask.shape[0]):
        name = f"model.layers.{layer}.self_attn.attn"
        full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=128, dtype=torch.bfloat16)
        specs[name] = layer_spec(full, config, runtime, layer)
        if 0 < mask[layer].sum() < mask.shape[1]:
            specs[f"{name}.{COMPANION_SUFFIX}"] = streaming_spec_for_layer(
                config, runtime, layer, head_size=128, head_size_v=128, dtype=torch.bfloat16)
    return specs, runtime


def _run_planner() -> None:
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine import core
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from duo_vllm.kv_cache.manager import DuoStreamingManager
    from duo_vllm.kv_cache.spec import DuoStreamingSpec
    from duo_vllm.vllm_support import kv_cache_planning_module

    planning = kv_cache_planning_module()
    config = _stub_config()
    specs, runtime = _duo_specs(config)
    streaming = sorted(n for n, s in specs.items() if isinstance(s, DuoStreamingSpec))
    print(f"  {len(specs)} layer specs, {len(streaming)} DuoStreamingSpec "
          f"(block {specs[streaming[0]].block_size}, sink {runtime.sink}, recent {runtime.recent})")

    # The engine core's registration, through DUO's wrapper of the name it imported.
    core.register_all_kvcache_specs(config)
    manager = KVCacheSpecRegistry.get_manager_class(specs[streaming[0]])
    record("6", "engine core registration knows DuoStreamingSpec", manager is DuoStreamingManager,
           getattr(manager, "__name__", str(manager)), gating=False)
    KVCacheSpecRegistry.check_kv_cache_spec_registry(specs)

    groups = planning.get_kv_cache_groups(config, dict(specs))
    kinds = [sorted({type(s).__name__ for s in _group_specs(g)}) for g in groups]
    partition = sorted(n for g in groups for n in g.layer_names) == sorted(specs)
    record("6", f"{planning.__name__}.get_kv_cache_groups -> 2 groups", len(groups) == 2 and partition,
           f"{len(groups)} groups {kinds}", gating=False)

    builder_cls = getattr(planning, "DefaultKVCacheConfigBuilder", None)
    if builder_cls is not None and hasattr(planning, "get_kv_cache_groups_from_builder"):
        builder = builder_cls()
        via_builder = planning.get_kv_cache_groups_from_builder(builder, config, dict(specs))
        record("6", "DefaultKVCacheConfigBuilder -> the same 2 groups",
               [g.layer_names for g in via_builder] == [g.layer_names for g in groups], gating=False)

    kv_config = _plan_configs(planning, config, specs)
    if kv_config is None:
        return
    print(f"  KVCacheConfig: {kv_config.num_blocks} blocks, {len(kv_config.kv_cache_groups)} groups, "
          f"{len(kv_config.kv_cache_tensors)} tensors")
    record("6", "get_kv_cache_configs plans 2 groups", len(kv_config.kv_cache_groups) == 2,
           f"{kv_config.num_blocks} blocks", gating=False)
    concurrency = kv_cache_utils.get_max_concurrency_for_kv_cache_config(config, kv_config)
    record("6", "get_max_concurrency_for_kv_cache_config (DUO wrapper)", concurrency > 0,
           f"{concurrency:.2f} requests of {config.model_config.max_model_len} tokens", gating=False)


def _group_specs(group):
    spec = group.kv_cache_spec
    return getattr(spec, "kv_cache_specs", {"": spec}).values()


def _plan(planning, config, specs, memory=256 * 2**20):
    """Full planning (grouping, pool sizing, placement) of one worker for ``memory`` bytes, in
    whichever form this release has it."""
    params = inspect.signature(planning.get_kv_cache_configs).parameters
    if "global_kv_cache_groups" in params:
        groups = planning.get_global_kv_cache_groups(config, [dict(specs)])
        return planning.get_kv_cache_configs(config, [dict(specs)], [memory], groups)
    return planning.get_kv_cache_configs(config, [dict(specs)], [memory])


def _plan_configs(planning, config, specs):
    """_plan's config; None when the stub config cannot satisfy it (reported, not fatal)."""
    try:
        return _plan(planning, config, specs)[0]
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record("6", "get_kv_cache_configs on the stub config", False, first_line(exc), gating=False)
        return None


# ---- (7) 0.34's extensible KV cache on DUO-shaped specs ----------------------------------------

def step_extensible() -> None:
    header("7. extensible KV cache: vLLM's resizing after warm-up on DUO-shaped specs (no GPU)")
    from duo_vllm.vllm_support import kv_cache_planning_module

    planning = kv_cache_planning_module()
    if not hasattr(planning, "finalize_extensible_kv_cache"):
        record("7", f"{planning.__name__}.finalize_extensible_kv_cache", None,
               "skipped: no extensible KV cache in this release")
        return
    try:
        _run_extensible(planning)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        record("7", "extensible KV cache run", False, first_line(exc))


def _peak_blocks(config, groups, max_model_len: int, *, in_step: bool = True) -> int:
    """Pool blocks one request of ``max_model_len`` tokens holds at DUO's in-step peak (or
    between steps), counted from the specs, not through max_memory_usage_bytes: per group its
    largest layer; retrieval layers keep every token, streaming layers sink + window (+ the
    tokens in flight)."""
    from vllm.utils.math_utils import cdiv

    from duo_vllm.kv_cache.spec import DuoStreamingSpec

    def blocks(spec) -> int:
        if not isinstance(spec, DuoStreamingSpec):
            return cdiv(max_model_len, spec.block_size)
        if in_step:
            return spec.max_admission_blocks_per_request(config.max_in_flight_tokens, max_model_len)
        return spec.max_blocks_per_request(max_model_len)

    return sum(max(blocks(s) for s in _group_specs(g)) for g in groups)


def _finalize(planning, specs, original_max_model_len: int, measured: int, reserved_memory: int):
    """Plan the reserved pool, then run finalize_extensible_kv_cache as the engine core does
    after warm-up, with the workers' measured block count (the part that needs a GPU) stubbed.
    Returns (config, the final block count or the ValueError raised)."""
    from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config
    from vllm.v1.worker.worker_base import CompilationTimes

    config = _stub_config()
    config.model_config.original_max_model_len = original_max_model_len
    config.cache_config.enable_extensible_kv_cache = True
    kv_configs = _plan(planning, config, specs, reserved_memory)
    scheduler = generate_scheduler_kv_cache_config(kv_configs)
    measured_times = [CompilationTimes(0.0, 0.0, num_kv_blocks=measured)]
    try:
        return config, planning.finalize_extensible_kv_cache(config, kv_configs, scheduler,
                                                             measured_times)
    except ValueError as exc:
        return config, exc


def _run_extensible(planning) -> None:
    config = _stub_config()
    specs, _ = _duo_specs(config)
    probe = _plan(planning, _stub_config(), specs)[0]
    groups, length = probe.kv_cache_groups, config.model_config.max_model_len
    bytes_per_block = sum(t.size for t in probe.kv_cache_tensors) // probe.num_blocks
    peak = _peak_blocks(config, groups, length)
    between = _peak_blocks(config, groups, length, in_step=False)
    # Measured pools (num_blocks - 1 usable: the null block): one that holds the between-steps
    # footprint but not the peak, one that just holds the peak. Twice that is reserved.
    short, enough = (between + peak) // 2 + 1, peak + 1
    reserved = 2 * enough * bytes_per_block
    print(f"  max_model_len {length}: peak {peak} blocks, between steps {between}; "
          f"{2 * enough} blocks reserved, {short} or {enough} measured")

    config, result = _finalize(planning, specs, length, short, reserved)
    record("7", f"(a) fixed max_model_len, measured {short} blocks (peak {peak} > {short - 1} "
           "usable): finalize raises ValueError", isinstance(result, ValueError),
           shorten(str(result).splitlines()[0], 120) if isinstance(result, ValueError) else f"kept {result} blocks")

    config, result = _finalize(planning, specs, -1, short, reserved)
    usable = short - 1
    expected = next(n for n in range(length, 0, -1) if _peak_blocks(config, groups, n) <= usable)
    got = config.model_config.max_model_len
    record("7", f"(b) auto-fit, measured {short} blocks: max_model_len refitted to the longest "
           "whose peak fits", result == short and got == expected,
           f"{length} -> {got} (expected {expected}: peak {_peak_blocks(config, groups, expected)}"
           f" <= {usable} usable < {_peak_blocks(config, groups, expected + 1)} at {expected + 1})"
           if not isinstance(result, Exception) else first_line(result))

    for original in (length, -1):
        config, result = _finalize(planning, specs, original, enough, reserved)
        got = config.model_config.max_model_len
        record("7", f"(c) {'fixed max_model_len' if original > 0 else 'auto-fit'}, measured "
               f"{enough} blocks (holds the peak): nothing changes", result == enough and got == length,
               f"{result} blocks, max_model_len {got}")
