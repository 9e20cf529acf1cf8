"""benchmarks/serve_throughput.py without a server: its arguments, the DUO / stock ratios, the
table and the plot from a result file. The script end to end (`vllm bench serve` against a DUO
server) is tests/duo_vllm/backends/test_cpu_serving_faults.py."""

from __future__ import annotations

import json

import pytest
import serve_throughput


def figures(throughput: float, ttft: float, tpot: float) -> dict:
    return {"output_throughput": throughput, "request_throughput": throughput / 100, "median_ttft_ms": ttft / 2,
            "p99_ttft_ms": ttft, "median_tpot_ms": tpot / 2, "p99_tpot_ms": tpot, "completed": 8,
            "total_output_tokens": 800, "duration": 10.0, "preemptions": 3.0, "peak_kv_cache_usage": 0.9,
            "peak_running": 4.0, "failed": 0}


RESULT = {"command": "python benchmarks/serve_throughput.py ...", "device": "NVIDIA H200", "vllm": "0.33.0",
          "model_label": "llama3-8b-gqa-50", "workload": "64 requests", "rates": ["1", "inf"],
          "runs": {"stock": {"1": figures(100, 2000, 40), "inf": figures(200, 30000, 80)},
                   "duo": {"1": figures(100, 1500, 30), "inf": figures(310, 20000, 60)}}}


def test_ratios_per_rate():
    ratios = serve_throughput.ratios(RESULT["runs"])
    assert ratios["inf"]["output_throughput"] == pytest.approx(1.55)
    assert ratios["inf"]["p99_ttft_speedup"] == pytest.approx(1.5)
    assert ratios["1"]["output_throughput"] == pytest.approx(1.0)
    assert serve_throughput.ratios({"duo": RESULT["runs"]["duo"]}) == {}  # no stock, no ratio


def test_table_and_plot_from_a_result_file(tmp_path):
    result = {**RESULT, "duo_over_stock": serve_throughput.ratios(RESULT["runs"])}
    text = serve_throughput.table(result)
    assert "DUO / stock at rate inf: output tokens/s 1.55x" in text and text.count("\n") == 6
    path = tmp_path / "serve_throughput.json"
    path.write_text(json.dumps(result))
    pytest.importorskip("matplotlib")
    assert serve_throughput.plot(path).stat().st_size > 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--backends", "stock,duo"], "give --model or --case"),
    (["--model", "m", "--backends", "duo,vanilla"], "unknown ['vanilla']"),
    (["--model", "m", "--rates", "1,fast"], "'fast' is neither"),
    (["--model", "m", "--rates", "0"], "'0' is neither"),
    (["--case", "llama3-8b-gqa-50"], "--case needs --patterns"),
    (["--model", "m", "--duo", "{sparsity"], "--duo is not JSON"),
    (["--server", "http://x", "--model", "m", "--backends", "stock,duo"], "one backend name"),
])
def test_bad_arguments_name_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        serve_throughput.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_merge_joins_one_backend_runs_and_refuses_other_workloads(tmp_path, capsys):
    paths = []
    for backend in ("stock", "duo"):
        part = {**RESULT, "command": f"serve_throughput.py --backends {backend}", "server_args": ["--kv-cache-dtype", "fp8"],
                "runs": {backend: RESULT["runs"][backend]}, "kv_tokens": {backend: 1000 if backend == "stock" else 2000}}
        paths.append(tmp_path / f"{backend}.json")
        paths[-1].write_text(json.dumps(part))
    assert serve_throughput.main(["--merge", *map(str, paths), "--out", str(tmp_path / "both")]) == 0
    merged = json.loads((tmp_path / "both" / "serve_throughput.json").read_text())
    assert set(merged["runs"]) == {"stock", "duo"} and len(merged["command"]) == 2
    assert merged["kv_tokens"] == {"stock": 1000, "duo": 2000}
    assert merged["duo_over_stock"]["inf"]["output_throughput"] == pytest.approx(1.55)
    assert "DUO / stock at rate inf: output tokens/s 1.55x" in capsys.readouterr().out

    other = json.loads(paths[1].read_text())
    other["workload"] = "8 requests"
    paths[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="differs in workload"):
        serve_throughput.main(["--merge", *map(str, paths), "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match=r"repeats backend \['stock'\]"):
        serve_throughput.main(["--merge", str(paths[0]), str(paths[0]), "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="--merge: cannot read .*missing.json"):
        serve_throughput.main(["--merge", str(paths[0]), str(tmp_path / "missing.json"), "--out", str(tmp_path / "bad")])
    (tmp_path / "other.json").write_text('{"rates": ["inf"]}')
    with pytest.raises(SystemExit, match="other.json is not a serve_throughput.py result"):
        serve_throughput.main(["--merge", str(paths[0]), str(tmp_path / "other.json"), "--out", str(tmp_path / "bad")])


def test_case_refuses_a_tokenizer_folder_without_a_tokenizer(tmp_path):
    args = serve_throughput.argparse.Namespace(case="llama3-8b-gqa-50", model=None, patterns=str(tmp_path),
                                               tokenizer=str(tmp_path), duo="{}", max_model_len=None)
    with pytest.raises(SystemExit, match="no tokenizer.json there"):
        serve_throughput.served_model(args)


LLAMA = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
         "intermediate_size": 512, "vocab_size": 1000}


def test_flop_ratio_matches_a_sum_over_drawn_lengths():
    """The closed form (moments of vLLM's uniform draw) against summing every request's FLOPs."""
    import numpy as np
    from _common import parameters

    duo = {"sparsity": 0.75, "sink": 8, "recent": 24}
    got = serve_throughput.flop_ratio(LLAMA, duo, 3000, 40, 0.5)
    lhd, params, window = 4 * 8 * 32, parameters(LLAMA), 32
    n = np.linspace(1500, 4500, 200_001)  # prompt lengths, uniform; outputs fixed at their mean
    weights = 2 * params * (n + 40)
    stock = 2 * lhd * n**2 + 4 * lhd * (n + 20) * 40
    duo_attn = 0.25 * stock + 0.75 * 4 * lhd * window * (n + 40)
    assert got["ratio"] == pytest.approx((weights + stock).sum() / (weights + duo_attn).sum(), rel=1e-6)
    assert got["attention_share_stock"] == pytest.approx(stock.sum() / (weights + stock).sum(), rel=1e-6)
    assert got["streaming_window_tokens"] == window and got["retrieval_fraction"] == 0.25


def test_flop_ratio_grows_with_the_prompt_and_needs_the_sparsity():
    ratios = [serve_throughput.flop_ratio(LLAMA, {"sparsity": 0.5}, n, 256, 0.33)["ratio"] for n in (2048, 32768, 131072)]
    assert 1.0 < ratios[0] < ratios[1] < ratios[2] < 2.0  # attention halves at most: never past 1 / 0.5
    assert serve_throughput.flop_ratio(LLAMA, {"sparsity": 0.0}, 32768, 256, 0.33)["ratio"] == pytest.approx(1.0)
    assert serve_throughput.flop_ratio(LLAMA, {}, 32768, 256, 0.33) is None  # the pattern's own sparsity: unknown
    assert serve_throughput.flop_ratio({"hidden_size": 64}, {"sparsity": 0.5}, 32768, 256, 0.33) is None
    moe = {**LLAMA, "num_experts": 8}  # no top-k: the weights a token runs are unknown
    assert serve_throughput.flop_ratio(moe, {"sparsity": 0.5}, 32768, 256, 0.33) is None
    deepseek = {**LLAMA, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6}
    assert serve_throughput.flop_ratio(deepseek, {"sparsity": 0.5}, 32768, 256, 0.33) is None


def test_flop_ratio_of_a_sparse_moe_counts_the_active_experts():
    from _common import QWEN3_30B_A3B, parameters

    got = serve_throughput.flop_ratio(QWEN3_30B_A3B, {"sparsity": 0.5}, 16384, 256, 0.33)
    assert got["parameters"] == parameters(QWEN3_30B_A3B) < parameters(QWEN3_30B_A3B, active=False) / 9
    # 3.4B weights a token runs against 48 layers x 32 heads of attention: half the FLOPs at 16K
    assert 0.45 < got["attention_share_stock"] < 0.55 and 1.25 < got["ratio"] < 1.4


def test_kv_tokens_from_the_start_up_log_and_in_the_table():
    gpu = ("(EngineCore pid=2316) INFO 12-07 07:33:55 [kv_cache_utils.py:1147] GPU KV cache size: 892,256 tokens, "
           "Maximum concurrency for 131,072 tokens per request: 6.81x")
    cpu = "(MainProcess pid=2916) INFO 12-07 06:51:18 [kv_cache_utils.py:2327] CPU KV cache size: 381,300 tokens, Max"
    assert serve_throughput.kv_tokens_from_log("start\n" + gpu + "\nready") == 892256
    assert serve_throughput.kv_tokens_from_log(cpu) == 381300
    assert serve_throughput.kv_tokens_from_log("no capacity line") is None
    result = {**RESULT, "kv_tokens": {"stock": 892256, "duo": 1741280}}
    assert "KV cache: stock 892,256 tokens, DUO 1,741,280 (1.95x)" in serve_throughput.table(result)
    assert "KV cache" not in serve_throughput.table({**RESULT, "kv_tokens": {"stock": 892256}})


def test_the_table_says_how_far_the_mix_fills_each_servers_kv():
    result = {**RESULT, "kv_tokens": {"stock": 892256, "duo": 1741280}, "mix_tokens": 160 * 9500}
    line = [x for x in serve_throughput.table(result).splitlines() if x.startswith("the whole mix")]
    assert line == ["the whole mix at its end: 1,520,000 tokens = 1.70x stock's, 0.87x duo's KV (below 1: held all "
                    "at once, no memory pressure)"]
    assert "whole mix" not in serve_throughput.table({**RESULT, "mix_tokens": 1000})  # no capacity known
    assert "whole mix" not in serve_throughput.table({**RESULT, "kv_tokens": {"duo": None}, "mix_tokens": 1000})


def test_merge_reads_each_servers_log_beside_its_part_for_the_two_phase_model(tmp_path, capsys):
    from .test_engine_phases import log

    speeds = {"stock": (36000, 3000), "duo": (36000, 6000)}
    paths = []
    for backend, (prefill, decode) in speeds.items():
        (tmp_path / backend).mkdir()
        runs = {"inf": {**figures(200 if backend == "stock" else 310, 30000, 80), "total_output_tokens": 300_000}}
        part = {**RESULT, "rates": ["inf"], "runs": {backend: runs}, "mix_tokens": 3_900_000}
        paths.append(tmp_path / backend / "serve_throughput.json")
        paths[-1].write_text(json.dumps(part))
        (tmp_path / backend / f"serve_throughput_{backend}.log").write_text(
            log((prefill, 100, 50, 200), (0, decode, 100, 150)))
    assert serve_throughput.main(["--merge", *map(str, paths), "--out", str(tmp_path / "both")]) == 0
    merged = json.loads((tmp_path / "both" / "serve_throughput.json").read_text())
    assert merged["phase_rates"]["duo"]["decode_tokens_per_s"] == 6000
    # 3.6M prompt tokens (the mix less its outputs): 100 s of prefill on both; decode 100 s and 50 s
    assert merged["phase_model"]["predicted_ratio"] == pytest.approx(200 / 150)
    assert "so all at once DUO / stock = 1.33x" in capsys.readouterr().out
    assert serve_throughput.mix_phase_model({**merged, "runs": {"duo": merged["runs"]["duo"]}}) is None
