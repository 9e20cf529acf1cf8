"""Per-layer specs, tensor-parallel head slots, the two KV-cache groups and the capacity report."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs

from duo_vllm.config import DuoConfig
from duo_vllm.kv_cache.grouping import duo_kv_cache_groups
from duo_vllm.kv_cache.layers import layer_spec, streaming_spec_for_layer
from duo_vllm.kv_cache.report import kv_report
from duo_vllm.kv_cache.spec import DuoStreamingSpec, planned_streaming_block_size, streaming_block_size
from duo_vllm.pattern import shard_for_tensor_parallel
from duo_vllm.runtime import DuoRuntime


def runtime_for(mask: np.ndarray, tp_size: int = 1, tp_rank: int = 0, sink: int = 64, recent: int = 256):
    return DuoRuntime(DuoConfig(sink=sink, recent=recent), pattern=None, sparsity=None,
                      retrieval_mask=mask, tp_size=tp_size, tp_rank=tp_rank)


def fake_vllm_config(block_size=16, max_model_len=4096, hybrid=True):
    return SimpleNamespace(
        max_in_flight_tokens=2048,
        cache_config=SimpleNamespace(block_size=block_size, cache_dtype="auto"),
        model_config=SimpleNamespace(max_model_len=max_model_len, dtype=torch.bfloat16,
                                     get_head_size=lambda: 128),
        scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=not hybrid),
    )


def full_spec(heads: int, block_size: int = 16) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block_size, num_kv_heads=heads, head_size=128, dtype=torch.bfloat16)


masks = st.integers(1, 6).flatmap(lambda layers: st.sampled_from([1, 2, 4, 8]).flatmap(
    lambda heads: st.lists(st.lists(st.booleans(), min_size=heads, max_size=heads),
                           min_size=layers, max_size=layers).map(np.array)))


@settings(max_examples=150, deadline=None)
@given(mask=masks, tp_log=st.integers(0, 3))
def test_every_rank_reports_the_same_specs(mask, tp_log):
    """vLLM requires identical per-layer specs on all TP ranks; each rank's heads must fit them."""
    tp = 2**tp_log
    config = fake_vllm_config()
    specs_per_rank = []
    for rank in range(tp):
        runtime = runtime_for(mask, tp, rank)
        slots = runtime.head_slots
        local = shard_for_tensor_parallel(mask, tp, rank)
        assert (local.sum(axis=1) <= slots.retrieval).all()
        assert ((~local).sum(axis=1) <= slots.streaming).all()
        specs = []
        for layer in range(mask.shape[0]):
            main = layer_spec(full_spec(local.shape[1]), config, runtime, layer)
            companion = (streaming_spec_for_layer(config, runtime, layer, head_size=128, head_size_v=128,
                                                  dtype=torch.bfloat16)
                         if slots.retrieval[layer] and slots.streaming[layer] else None)
            specs.append((main, companion))
        specs_per_rank.append(specs)
        if tp == 1:
            assert slots.padding == 0
        assert slots.padding == int((slots.retrieval + slots.streaming - local.shape[1]).sum())
    assert all(specs == specs_per_rank[0] for specs in specs_per_rank)


def test_tp_padding_is_counted():
    # layer 0: rank 0 has 2 retrieval heads, rank 1 none -> both ranks need 2 + 2 slots for 2 heads
    mask = np.array([[True, True, False, False]])
    slots = runtime_for(mask, tp_size=2).head_slots
    assert slots.retrieval.tolist() == [2] and slots.streaming.tolist() == [2]
    assert slots.padding == 2 * 1 * 1 and slots.local_kv_heads == 2


def test_layer_without_retrieval_heads_reports_the_streaming_spec():
    mask = np.array([[False, False], [True, False], [True, True]])
    runtime, config = runtime_for(mask), fake_vllm_config()
    specs = [layer_spec(full_spec(2), config, runtime, layer) for layer in range(3)]
    assert isinstance(specs[0], DuoStreamingSpec) and specs[0].num_kv_heads == 2
    assert type(specs[1]) is FullAttentionSpec and specs[1].num_kv_heads == 1
    assert type(specs[2]) is FullAttentionSpec and specs[2].num_kv_heads == 2


def test_two_groups_partition_the_layers():
    mask = np.array([[False, True], [True, False], [True, True], [False, False]])
    runtime, config = runtime_for(mask), fake_vllm_config()
    specs = {}
    for layer in range(4):
        name = f"model.layers.{layer}.self_attn.attn"
        specs[name] = layer_spec(full_spec(2), config, runtime, layer)
        if 0 < mask[layer].sum() < 2:
            specs[f"{name}.duo_streaming"] = streaming_spec_for_layer(
                config, runtime, layer, head_size=128, head_size_v=128, dtype=torch.bfloat16)
    groups = duo_kv_cache_groups(config, specs)
    assert len(groups) == 2
    retrieval, streaming = groups
    assert all(isinstance(g.kv_cache_spec, UniformTypeKVCacheSpecs) for g in groups)
    assert sorted(retrieval.layer_names + streaming.layer_names) == sorted(specs)
    assert all(not isinstance(specs[n], DuoStreamingSpec) for n in retrieval.layer_names)
    assert all(isinstance(specs[n], DuoStreamingSpec) for n in streaming.layer_names)
    # without streaming specs vLLM's own grouping decides
    assert duo_kv_cache_groups(config, {"a": full_spec(1), "b": full_spec(2)}) is None
    with pytest.raises(ValueError, match="hybrid KV-cache manager"):
        duo_kv_cache_groups(fake_vllm_config(hybrid=False), specs)


@settings(max_examples=200, deadline=None)
@given(block=st.sampled_from([16, 32, 64, 128]), r=st.integers(1, 2000), s=st.integers(1, 2000),
       sink=st.integers(1, 256), recent=st.integers(1, 2048), max_len=st.sampled_from([2048, 8192, 131072]))
def test_streaming_block_size_never_loses_to_the_retrieval_block_size(block, r, s, sink, recent, max_len):
    chosen = streaming_block_size(block, r, s, sink=sink, recent=recent, max_model_len=max_len)
    assert chosen >= 1 and (chosen % block == 0 or block % chosen == 0)

    def cost(size):
        spec = DuoStreamingSpec(block_size=size, num_kv_heads=1, head_size=1, dtype=torch.int8,
                                sink=sink, recent=recent)
        blocks = -(-max_len // block) + spec.max_blocks_per_request(max_len)
        return blocks * max(r * block, s * size)

    assert cost(chosen) <= cost(block)


def test_report_figures_by_hand():
    # 2 layers x 2 KV heads, one retrieval head each; bf16, head 128: 512 B per head and token
    mask = np.array([[True, False], [False, True]])
    runtime = runtime_for(mask, sink=16, recent=48)
    report = kv_report(fake_vllm_config(block_size=16, max_model_len=1024), context_len=1024,
                       runtime=runtime)
    assert report.stock_bytes_per_token == 4 * 512
    assert report.retrieval_bytes_per_token == 2 * 512
    assert report.streaming_bytes_per_request == 2 * 64 * 512
    assert report.streaming_block_size == 16
    assert report.streaming_blocks_per_request == 1 + 3 + 1  # sink, ceil(47 / 16), slack
    assert report.theoretical_ratio == pytest.approx(4 * 1024 / (2 * 1024 + 2 * 64))
    assert report.planned_ratio == pytest.approx(4 * 1024 / ((64 + 5) * 2 * 16))
    assert "capacity vs stock" in report.line()


def test_report_command_on_the_real_model(smollm2, capsys):
    """``python -m duo_vllm.kv_cache.report`` plans from the config alone (no engine starts)."""
    import re

    from duo_vllm.kv_cache.report import main

    main([smollm2, "--max-model-len", "8192", "--duo", '{"sparsity": 0.5}'])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("DUO KV cache:"))
    ratio, bound = map(float, re.search(r"at 8,192 tokens: ([\d.]+)x \(pattern's bound ([\d.]+)x\)", line).groups())
    assert 0.95 * bound <= ratio <= bound < 2.0
    assert "retrieval heads 11,520 B/token (stock 23,040 B/token)" in line  # SmolLM2, bf16, 45 of 90 heads


@pytest.mark.parametrize("bad", ["{sparsity: 0.5", "[0.5]"])
def test_report_command_rejects_bad_options(bad, capsys):
    from duo_vllm.kv_cache.report import main

    with pytest.raises(SystemExit) as exit_info:
        main(["some-model", "--duo", bad])
    assert exit_info.value.code == 2
    assert "--duo" in capsys.readouterr().err


def test_report_command_names_a_bad_option(smollm2, capsys):
    from duo_vllm.kv_cache.report import main

    with pytest.raises(SystemExit) as exit_info:
        main([smollm2, "--duo", '{"sparsity": 1.5}'])
    assert exit_info.value.code == 2
    assert 'DUO option "sparsity" must be a number in [0, 1]' in capsys.readouterr().err


def test_streaming_block_is_decided_once_and_shared_with_the_report():
    """After planning, vLLM sets cache_config.block_size to the smallest group block size: the
    streaming spec asked for again, and the engine's KV report, must keep the first decision."""
    mask = np.array([[True, False, False, False], [True, True, False, False]])
    runtime, config = runtime_for(mask, sink=16, recent=48), fake_vllm_config(block_size=16, max_model_len=1024)
    first = streaming_spec_for_layer(config, runtime, 0, head_size=128, head_size_v=128, dtype=torch.bfloat16)
    config.cache_config.block_size = 4  # what the engine core does after planning
    again = streaming_spec_for_layer(config, runtime, 0, head_size=128, head_size_v=128, dtype=torch.bfloat16)
    assert again.block_size == first.block_size
    assert kv_report(config, context_len=1024, runtime=runtime).streaming_block_size == first.block_size
    # an explicit block size is a what-if: computed afresh, the decision untouched
    what_if = kv_report(config, context_len=1024, runtime=runtime, block_size=4)
    assert what_if.streaming_block_size == streaming_block_size(4, 3, 5, sink=16, recent=48, max_model_len=1024)
    assert planned_streaming_block_size(runtime, config) == first.block_size
    # another engine configuration in the process (same runtime, its own cache_config) decides for itself
    other = fake_vllm_config(block_size=4, max_model_len=1024)
    assert planned_streaming_block_size(runtime, other) == streaming_block_size(4, 3, 5, sink=16, recent=48,
                                                                                max_model_len=1024)
    assert kv_report(other, context_len=1024, runtime=runtime).block_size == 4
