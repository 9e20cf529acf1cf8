"""DUO's KV plan under pipeline parallelism, through vLLM's own planner.

vLLM's CPU build cannot run pipeline parallelism even for stock attention (its later stages fail
at the first step), so the per-stage planning is tested below the engine: each stage's layers (vLLM's
``get_pp_indices`` split) report DUO's specs, and vLLM's ``get_kv_cache_configs`` and
``generate_scheduler_kv_cache_config`` turn them into the per-stage and scheduler configs an
engine would use.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm.distributed.utils import get_pp_indices
from vllm.v1.kv_cache_interface import FullAttentionSpec

from duo_vllm.backends.cpu import DuoAttentionBackend
from duo_vllm.config import DuoConfig, DuoConfigError
from duo_vllm.kv_cache.layers import COMPANION_SUFFIX, layer_spec, streaming_spec_for_layer
from duo_vllm.kv_cache.spec import DuoStreamingSpec, planned_streaming_block_size
from duo_vllm.patches.kv_cache_layout import register_duo_specs
from duo_vllm.runtime import DuoRuntime, check_pipeline_parallel
from duo_vllm.vllm_support import kv_cache_planning_module

HEAD_SIZE = 64
MEMORY = 1 << 31  # bytes of KV cache per worker (planned, never allocated)


@pytest.fixture(scope="module")
def quiet_config(smollm2):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=smollm2, max_model_len=4096, block_size=16).create_engine_config()
    # What the engine core resolves from DUO's backends before planning.
    config.cache_config.kv_cache_layout = DuoAttentionBackend.supported_kv_cache_layouts()[0].name
    register_duo_specs(config)
    return Quiet(config)


class Quiet:
    """The config behind a short repr: hypothesis prints its test's arguments on failure and
    cannot print a VllmConfig."""

    def __init__(self, config) -> None:
        self.config = config

    def __repr__(self) -> str:
        return "<VllmConfig of SmolLM2-135M>"


def layer_name(index: int) -> str:
    return f"model.layers.{index}.self_attn.attn"


def stage_specs(vllm_config, runtime, layers: range) -> dict:
    """What the attention layers of one stage report (``patches/kv_cache_layout.py``): the
    layer's own spec, plus its streaming companion's when it has heads of both kinds."""
    full = FullAttentionSpec(block_size=vllm_config.cache_config.block_size,
                             num_kv_heads=runtime.head_slots.local_kv_heads, head_size=HEAD_SIZE,
                             dtype=torch.bfloat16)
    specs = {}
    for index in layers:
        spec = specs[layer_name(index)] = layer_spec(full, vllm_config, runtime, index)
        if not isinstance(spec, DuoStreamingSpec) and runtime.head_slots.streaming[index]:
            specs[f"{layer_name(index)}.{COMPANION_SUFFIX}"] = streaming_spec_for_layer(
                vllm_config, runtime, index, head_size=HEAD_SIZE, head_size_v=HEAD_SIZE, dtype=torch.bfloat16)
    return specs


def plan(vllm_config, workers: list[dict]):
    from vllm.v1.core import kv_cache_utils

    planner = kv_cache_planning_module()
    configs = planner.get_kv_cache_configs(vllm_config, workers, [MEMORY] * len(workers))
    return configs, kv_cache_utils.generate_scheduler_kv_cache_config(configs)


masks = st.integers(2, 12).flatmap(lambda layers: st.sampled_from([1, 2, 4, 8]).flatmap(
    lambda heads: st.lists(st.lists(st.booleans(), min_size=heads, max_size=heads),
                           min_size=layers, max_size=layers).map(np.array)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mask=masks, pp=st.integers(2, 4))
def test_each_stage_plans_its_own_layers_of_the_two_groups(quiet_config, mask, pp):
    vllm_config = quiet_config.config
    pp = min(pp, mask.shape[0])
    runtime = DuoRuntime(DuoConfig(sink=16, recent=64), pattern=None, sparsity=None, retrieval_mask=mask)
    stages = [range(*get_pp_indices(mask.shape[0], rank, pp)) for rank in range(pp)]
    workers = [stage_specs(vllm_config, runtime, layers) for layers in stages]
    whole = stage_specs(vllm_config, runtime, range(mask.shape[0]))
    vllm_config.parallel_config.pipeline_parallel_size = pp
    try:
        configs, scheduler = plan(vllm_config, workers)
    finally:
        vllm_config.parallel_config.pipeline_parallel_size = 1
    (single,), single_scheduler = plan(vllm_config, [whole])

    # A stage reports for its layers exactly what the whole model reports for them.
    assert {name: spec for worker in workers for name, spec in worker.items()} == whole
    # Each stage's groups hold its own layers and nothing else; the pool is one size everywhere.
    for worker, config in zip(workers, configs):
        assert sorted(name for group in config.kv_cache_groups for name in group.layer_names) == sorted(worker)
        assert config.num_blocks == configs[0].num_blocks
    # A stage holds fewer layers than the whole model, so a block costs it no more.
    assert configs[0].num_blocks >= single.num_blocks
    # The scheduler runs DUO's two groups with the same block sizes as on one GPU.
    has_streaming, has_retrieval = (~mask).any(), mask.any(axis=1).any()
    kinds = [type(group.kv_cache_spec) for group in scheduler.kv_cache_groups]
    assert kinds == [type(group.kv_cache_spec) for group in single_scheduler.kv_cache_groups]
    if has_streaming and has_retrieval:
        retrieval, streaming = (group.kv_cache_spec for group in scheduler.kv_cache_groups)
        assert isinstance(streaming, DuoStreamingSpec) and (streaming.sink, streaming.recent) == (16, 64)
        assert streaming.block_size == planned_streaming_block_size(runtime, vllm_config)
        assert retrieval.block_size == vllm_config.cache_config.block_size


def test_a_stage_without_streaming_heads_keeps_the_streaming_group(quiet_config):
    """The first stage all retrieval, the second mixed: the first stage's streaming group is
    empty but still there, so both stages and the scheduler agree on the groups."""
    vllm_config = quiet_config.config
    mask = np.array([[True, True]] * 3 + [[True, False]] * 3)
    runtime = DuoRuntime(DuoConfig(sink=16, recent=64), pattern=None, sparsity=None, retrieval_mask=mask)
    workers = [stage_specs(vllm_config, runtime, range(0, 3)), stage_specs(vllm_config, runtime, range(3, 6))]
    vllm_config.parallel_config.pipeline_parallel_size = 2
    try:
        configs, scheduler = plan(vllm_config, workers)
    finally:
        vllm_config.parallel_config.pipeline_parallel_size = 1
    assert [len(group.layer_names) for group in configs[0].kv_cache_groups] == [3, 0]
    assert [len(group.layer_names) for group in configs[1].kv_cache_groups] == [3, 3]
    assert isinstance(scheduler.kv_cache_groups[1].kv_cache_spec, DuoStreamingSpec)


def test_pipeline_parallelism_is_refused_on_cpu_only():
    check_pipeline_parallel(1, "cpu")
    check_pipeline_parallel(2, "cuda")
    with pytest.raises(DuoConfigError, match="--tensor-parallel-size") as info:
        check_pipeline_parallel(2, "cpu")
    assert "with or without DUO" in str(info.value) and "\n" not in str(info.value)
