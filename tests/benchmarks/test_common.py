"""The benchmark scripts' shared library (benchmarks/_common.py, benchmarks/_plots.py): pure
functions, no GPU and no engine. The scripts themselves run on a GPU machine; here they only have
to start (``--help``) and import no other script."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import _common
import pytest
from _common import (
    BACKENDS,
    CASES,
    LLAMA2_7B,
    LLAMA3_8B,
    QWEN3_30B_A3B,
    SHAPES,
    DeviceFloors,
    case_pattern,
    device_floors,
    engine_kwargs,
    floors,
    json_object,
    model_dir,
    parameters,
    parse_backends,
)

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"  # on sys.path: conftest.py
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def llama3_report(window: int = 80) -> dict:
    """DUO's report for Llama-3-8B at 50% retrieval, bf16 KV, as floors() reads it."""
    stock = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head_dim x (K, V) x bf16
    retrieval = stock // 2
    return {"stock_bytes_per_token": stock, "retrieval_bytes_per_token": retrieval,
            "streaming_bytes_per_request": (stock - retrieval) * window, "streaming_window_tokens": window}


# ---------------------------------------------------------------- device floors


@pytest.mark.parametrize(("name", "figures"), [
    ("NVIDIA H100 80GB HBM3", (3.35e12, 989e12)),
    ("NVIDIA H100 PCIe", (2.0e12, 756e12)),  # before the plain "H100": the first match wins
    ("NVIDIA H100 NVL", (3.9e12, 835e12)),
    ("NVIDIA H200", (4.8e12, 989e12)),
    ("NVIDIA A100-SXM4-80GB", (2.039e12, 312e12)),
])
def test_device_floors_by_name(name, figures):
    assert device_floors(name) == DeviceFloors(*figures)


def test_device_floors_refuses_an_unknown_device_naming_the_flags():
    for given in ({}, {"bandwidth": 8.6e11}, {"peak_flops": 362e12}):
        with pytest.raises(SystemExit) as exc:
            device_floors("NVIDIA L40S", **given)
        message = str(exc.value)
        assert "NVIDIA L40S" in message and "--bandwidth" in message and "--peak-flops" in message


def test_device_floors_given_figures_win():
    assert device_floors("NVIDIA L40S", 8.6e11, 362e12) == DeviceFloors(8.6e11, 362e12)
    assert device_floors("NVIDIA H200", bandwidth=4.0e12) == DeviceFloors(4.0e12, 989e12)
    assert device_floors("NVIDIA H200", peak_flops=1e15) == DeviceFloors(4.8e12, 1e15)
    with pytest.raises(SystemExit, match="--bandwidth"):
        device_floors("NVIDIA H200", bandwidth=0)


def test_device_floors_as_recorded_in_result_files():
    recorded = json.loads((BENCHMARKS / "results" / "duo_speed_h200_per_request.json").read_text())
    case = next(iter(recorded["cases"].values())) if "cases" in recorded else recorded
    assert device_floors("NVIDIA H200").as_json() == case["device_floors"]


def test_device_floors_is_a_value_not_module_state():
    before = dict(_common.DEVICES)
    device_floors("NVIDIA L40S", 1e12, 1e14)
    device_floors("NVIDIA H100 80GB HBM3")
    assert _common.DEVICES == before
    assert not any(isinstance(v, DeviceFloors) for v in vars(_common).values())


# ---------------------------------------------------------------- the floors


def test_parameters_of_the_real_shapes():
    # Llama-3-8B: 8,030,261,248 weights, Llama-2-7B: 6,738,415,616; both less the RMSNorm weights
    norms = 32 * 2 * 4096 + 4096
    assert parameters(LLAMA3_8B) == 8_030_261_248 - norms
    assert parameters(LLAMA2_7B) == 6_738_415_616 - norms


def test_parameters_of_a_sparse_moe_shape_count_the_experts_a_token_runs():
    # Qwen3-30B-A3B's model card: 30.5B in all, 29.9B without the embeddings, 3.3B activated
    total, active = parameters(QWEN3_30B_A3B, active=False), parameters(QWEN3_30B_A3B)
    embeddings = 2 * 151936 * 2048
    assert total == pytest.approx(30.5e9, rel=2e-3) and total - embeddings == pytest.approx(29.9e9, rel=2e-3)
    assert active == pytest.approx(3.3e9, rel=2e-2)
    # a dense layer among the MoE ones (mlp_only_layers) runs the whole intermediate MLP
    one_dense = {**QWEN3_30B_A3B, "mlp_only_layers": [0]}
    h, moe = 2048, 8 * 3 * 2048 * 768 + 2048 * 128
    assert parameters(one_dense) - active == 3 * h * 6144 - moe
    # decoder_sparse_step 2: every other layer is MoE
    assert parameters({**QWEN3_30B_A3B, "decoder_sparse_step": 2}) - active == 24 * (3 * h * 6144 - moe)
    # Mixtral-style experts (num_local_experts, intermediate_size per expert)
    mixtral = {**LLAMA3_8B, "num_local_experts": 8, "num_experts_per_tok": 2}
    assert parameters(mixtral) - parameters(LLAMA3_8B) == 32 * (3 * 4096 * 14336 + 4096 * 8)
    assert parameters(mixtral, active=False) - parameters(LLAMA3_8B) == 32 * (7 * 3 * 4096 * 14336 + 4096 * 8)
    # Qwen2-MoE-style: a shared expert every token runs, with its one-output gate
    qwen2_moe = {**QWEN3_30B_A3B, "shared_expert_intermediate_size": 5632}
    assert parameters(qwen2_moe) - active == 48 * (3 * h * 5632 + h)
    assert parameters({**QWEN3_30B_A3B, "shared_expert_intermediate_size": None}) == active
    with pytest.raises(ValueError, match="shared or routed-expert"):
        parameters({**LLAMA3_8B, "n_routed_experts": 64, "n_shared_experts": 2})


def test_case_pattern_published_or_seeded_random(tmp_path):
    from duo_vllm.pattern_io import load_pattern

    assert case_pattern("Llama-2-7B-32K-Instruct", LLAMA2_7B, 0.75, str(tmp_path)) == str(
        tmp_path / "Llama-2-7B-32K-Instruct")
    with pytest.raises(SystemExit, match="--patterns is required for Llama-2-7B-32K-Instruct"):
        case_pattern("Llama-2-7B-32K-Instruct", LLAMA2_7B, 0.75, None)
    first, again, other = (load_pattern(case_pattern(None, QWEN3_30B_A3B, 0.5, None, seed=s)) for s in (0, 0, 1))
    assert first.gates.shape == (48, 4) and first.sparsity == 0.5
    assert (first.gates == again.gates).all() and not (first.gates == other.gates).all()
    assert "uniform random gates, seed 0" in first.provenance["derivation"]


def test_the_moe_case_is_planned_by_duo_with_its_random_pattern():
    """What the GPU run of the case will serve, planned from the config as DUO's front-end plans it
    (vLLM's EngineArgs, no engine, no weights): half the KV heads' bytes per token, about 2x."""
    from _common import duo_report

    config, pattern, sparsity, max_len = SHAPES["qwen3-30b-a3b-moe-50"]
    duo = {"pattern": case_pattern(pattern, config, sparsity, None), "sparsity": sparsity}
    report = duo_report(engine_kwargs(model_dir(config), max_len, 0.9, duo))
    assert report["stock_bytes_per_token"] == 48 * 4 * 128 * 2 * 2  # bf16 K and V of every KV head
    assert report["retrieval_bytes_per_token"] == report["stock_bytes_per_token"] // 2
    assert 1.9 < report["planned_ratio"] <= report["theoretical_ratio"] < 2.0


def test_floors_scale_with_the_device():
    report, n = llama3_report(), 32768
    h100 = floors(LLAMA3_8B, report, n, device_floors("NVIDIA H100 80GB HBM3"))
    h200 = floors(LLAMA3_8B, report, n, device_floors("NVIDIA H200"))
    for key in ("stock_decode_ms", "duo_decode_ms"):  # bandwidth-bound: 3.35 against 4.8 TB/s
        assert h100[key] / h200[key] == pytest.approx(4.8 / 3.35)
    for key in ("stock_prefill_s", "duo_prefill_s"):  # same bf16 peak
        assert h100[key] == pytest.approx(h200[key])
    doubled = floors(LLAMA3_8B, report, n, DeviceFloors(2 * 3.35e12, 2 * 989e12))
    assert all(doubled[k] == pytest.approx(h100[k] / 2) for k in h100)


def test_floors_scale_with_the_context():
    report, device = llama3_report(), device_floors("NVIDIA H200")
    weights_ms = 2 * parameters(LLAMA3_8B) / device.bandwidth * 1e3
    at = {n: floors(LLAMA3_8B, report, n, device) for n in (0, 65536, 131072)}
    assert at[0]["stock_decode_ms"] == pytest.approx(weights_ms)
    # stock decode reads every cached K/V: linear in the context; DUO reads half of it plus the window
    assert at[131072]["stock_decode_ms"] - weights_ms == pytest.approx(2 * (at[65536]["stock_decode_ms"] - weights_ms))
    kv_ms = at[131072]["stock_decode_ms"] - weights_ms
    assert at[131072]["duo_decode_ms"] - weights_ms == pytest.approx(
        kv_ms / 2 + report["streaming_bytes_per_request"] / device.bandwidth * 1e3)
    # prefill: weights linear, attention quadratic, of which DUO keeps half plus a linear window term
    assert at[131072]["stock_prefill_s"] > 2 * at[65536]["stock_prefill_s"]
    assert at[131072]["duo_prefill_s"] < at[131072]["stock_prefill_s"]
    all_retrieval = {**report, "retrieval_bytes_per_token": report["stock_bytes_per_token"],
                     "streaming_bytes_per_request": 0}
    same = floors(LLAMA3_8B, all_retrieval, 131072, device)
    assert same["duo_decode_ms"] == pytest.approx(same["stock_decode_ms"])
    assert same["duo_prefill_s"] == pytest.approx(same["stock_prefill_s"])


# ---------------------------------------------------------------- engines and backends


def test_engine_kwargs_stock_and_duo():
    stock = engine_kwargs("/m", 4096, 0.9, None, enforce_eager=True, kv_cache_dtype="fp8")
    assert stock == {"model": "/m", "load_format": "dummy", "skip_tokenizer_init": True, "dtype": "bfloat16",
                     "max_model_len": 4096, "gpu_memory_utilization": 0.9, "seed": 0, "enforce_eager": True,
                     "kv_cache_dtype": "fp8"}
    duo = {"pattern": "/patterns/x", "sparsity": 0.5}
    kwargs = engine_kwargs("/m", 4096, 0.9, duo, enforce_eager=True, kv_cache_dtype="fp8")
    assert kwargs == {**stock, "attention_backend": "DUO", "additional_config": {"duo": duo}}


def test_backends_change_one_option_each():
    duo = {"pattern": "/p", "sparsity": 0.5}
    assert BACKENDS["stock"](duo) is None
    assert BACKENDS["duo"](duo) == duo
    assert BACKENDS["duo-gather"](duo) == {**duo, "reorder_heads": False}
    assert BACKENDS["duo-overlap"](duo) == {**duo, "overlap_streaming": True}
    assert duo == {"pattern": "/p", "sparsity": 0.5}  # the case's options are not changed


def test_parse_backends():
    import argparse

    parser = argparse.ArgumentParser()
    assert parse_backends(parser, "stock,duo-overlap") == ["stock", "duo-overlap"]
    with pytest.raises(SystemExit):
        parse_backends(parser, "stock,duo-fast")


def test_json_object_option():
    assert json_object('{"flash_attn_version": 2}') == {"flash_attn_version": 2}
    for bad in ("[1]", "2", "x"):
        with pytest.raises(ValueError):
            json_object(bad)
    # argparse's message names the type, on every script that takes such an option
    for script in ("kv_capacity.py", "gpu_check_duo.py"):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--attention-config", "[2]"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
        assert out.returncode == 2 and "invalid JSON object value: '[2]'" in out.stderr, out.stderr[-2000:]


def test_gpu_check_refuses_a_chunk_that_is_not_positive():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check_duo.py"), "--prefill-chunk", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 2 and "--prefill-chunk 0: must be a positive number of tokens" in out.stderr, out.stderr[-2000:]


def test_model_dir_holds_the_config():
    folder = Path(model_dir(LLAMA2_7B))
    try:
        assert json.loads((folder / "config.json").read_text()) == LLAMA2_7B
    finally:
        (folder / "config.json").unlink()
        folder.rmdir()


def test_cases_patterns_and_shapes():
    for case in CASES.values():
        assert 0 < case["sparsity"] < 1 and case["lengths"] == sorted(case["lengths"])
        assert max(case["lengths"]) <= case["config"]["max_position_embeddings"]
    for name, (config, pattern, sparsity, max_len) in SHAPES.items():
        assert max_len <= config["max_position_embeddings"], name
        if name in CASES:  # one shape, one pattern and sparsity, whichever script runs it
            assert (CASES[name]["pattern"], CASES[name]["sparsity"]) == (pattern, sparsity)
    assert set(_common.DEFAULT_SHAPES) <= set(SHAPES)
    assert CASES["llama2-7b-mha-25"]["config"]["max_position_embeddings"] >= max(CASES["llama2-7b-mha-25"]["lengths"])
    assert LLAMA2_7B["max_position_embeddings"] == 32768  # the table's raised limit is a copy


# ---------------------------------------------------------------- plots and scripts


def test_plot_helpers(tmp_path):
    pytest.importorskip("matplotlib")
    from _plots import backend_colour, backend_label, marks, save_png, subplots

    assert backend_label("stock") == "stock FLASH_ATTN" and backend_label("duo-gather") == "duo-gather"
    assert len({backend_colour(b) for b in BACKENDS}) == len(BACKENDS)
    fig, ax = subplots()
    ax.bar([0, 1], [1.0, 2.0], color=[backend_colour("stock"), backend_colour("duo")])
    marks(ax, [0, 1], [0.5, 1.5], 18, label="floor")
    png = save_png(fig, tmp_path / "result.json")
    assert png == tmp_path / "result.png" and png.read_bytes().startswith(b"\x89PNG")


def test_no_script_imports_another():
    names = {p.stem for p in SCRIPTS}
    for script in SCRIPTS:
        for node in ast.walk(ast.parse(script.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not names & set(modules), f"{script.name} imports {names & set(modules)}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help(script):
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_engine_environment_fills_defaults_and_keeps_the_users(monkeypatch):
    import os

    import _common

    # A private copy of the environment: setting the real one here would leak into every later
    # test of the session (VLLM_ENABLE_V1_MULTIPROCESSING=0 runs their engines in-process).
    keys = set(_common.ENGINE_ENVIRONMENT) | {"VLLM_ENABLE_V1_MULTIPROCESSING"}
    env = {k: v for k, v in os.environ.items() if k not in keys} | {"VLLM_HOST_IP": "10.0.0.7"}
    monkeypatch.setattr(os, "environ", env)
    _common.set_engine_environment(VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert env["VLLM_HOST_IP"] == "10.0.0.7"
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
