"""duo_vllm.metrics: DUO's figures as Prometheus gauges of the process that serves /metrics.

The end-to-end check (the figures on a running server's /metrics) is in
tests/duo_vllm/backends/test_cpu_serving_faults.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from prometheus_client import REGISTRY, generate_latest

from duo_vllm import metrics
from duo_vllm.config import DuoConfig
from duo_vllm.runtime import build_runtime
from tests.duo_vllm.test_runtime import KV_HEADS, LAYERS, MODEL_NAME, SMOLLM2_CONFIG, random_gates, saved_pattern


def runtime_at(tmp_path, sparsity: float, sink: int = 16):
    folder = saved_pattern(tmp_path / f"p{sparsity}", random_gates(3), hf_config=SMOLLM2_CONFIG)
    return build_runtime(DuoConfig(pattern=folder, sparsity=sparsity, sink=sink), hf_config=dict(SMOLLM2_CONFIG),
                         model_name=MODEL_NAME, num_layers=LAYERS, total_kv_heads=KV_HEADS)


REPORT = SimpleNamespace(streaming_bytes_per_request=1_843_200, retrieval_bytes_per_token=23_040,
                         stock_bytes_per_token=46_080, planned_ratio=1.68)


def test_figures_follow_the_runtime_and_report(tmp_path):
    runtime = runtime_at(tmp_path, 0.5)
    values = metrics.figures(runtime, REPORT)
    assert values["duo:retrieval_ratio"] == runtime.retrieval_mask.mean() == 0.5
    assert values["duo:capacity_ratio"] == 1.68 and values["duo:stock_bytes_per_token"] == 46_080
    assert set(metrics.figures(runtime, None)) == {"duo:retrieval_ratio"}  # no block size yet: no byte figures


def test_publish_sets_gauges_and_replaces_the_pattern_label(tmp_path):
    metrics.publish(runtime_at(tmp_path, 0.5), REPORT)
    assert REGISTRY.get_sample_value("duo:capacity_ratio") == 1.68
    second = runtime_at(tmp_path, 0.75, sink=32)
    metrics.publish(second, None)  # a second engine config in the process, before vLLM chose a block size
    assert REGISTRY.get_sample_value("duo:retrieval_ratio") == second.retrieval_mask.mean() < 0.3
    assert np.isnan(REGISTRY.get_sample_value("duo:capacity_ratio")), "a figure of the first config was left"
    info = [line for line in generate_latest(REGISTRY).decode().splitlines() if line.startswith("duo:pattern_info{")]
    assert len(info) == 1, info
    assert 'selection="sparsity 0.75"' in info[0] and 'sink="32"' in info[0] and info[0].endswith(" 1.0")
    assert 'format="duo-vllm-json"' in info[0] and f'sha256="{second.pattern.content_hash}"' in info[0], info[0]
    assert len(second.pattern.content_hash) == 12


def test_publish_never_raises(tmp_path, caplog):
    metrics.publish(SimpleNamespace(), REPORT)  # not a runtime: logged, not raised
    assert "not published on /metrics" in caplog.text
