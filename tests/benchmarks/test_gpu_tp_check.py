"""benchmarks/gpu_tp_check.py without GPUs: its run names and which runs it compares. The
script itself runs only on a machine with several GPUs (its results: benchmarks/results/)."""

from __future__ import annotations

import gpu_tp_check
import pytest
from gpu_tp_check import Run, comparisons, parse_run


@pytest.mark.parametrize(("text", "run"), [
    ("DUO TP2", Run("DUO", tp=2)),
    ("stock", Run("stock")),
    ("DUO-full PP2", Run("DUO-full", pp=2)),
    ("DUO PP2 TP2 ray", Run("DUO", tp=2, pp=2, executor="ray")),
    ("stock  tp4", Run("stock", tp=4)),
])
def test_run_names_parse_and_print_back(text, run):
    assert parse_run(text) == run
    assert parse_run(run.name) == run and run.gpus == run.tp * run.pp


@pytest.mark.parametrize("text", ["", "vanilla TP2", "DUO TP0", "DUO TP2 TP4", "DUO PPx", "DUO mp", "DUO ray ray"])
def test_bad_run_names_name_the_grammar(text):
    with pytest.raises(ValueError, match="expected WHO"):
        parse_run(text)


def test_each_run_is_compared_with_its_kind_on_one_gpu_stock_and_the_reference():
    runs = [parse_run(t) for t in ("DUO TP1", "stock TP1", "DUO TP2", "stock TP2", "DUO-full TP2", "DUO PP2",
                                   "DUO-full PP2", "DUO TP2 ray")]
    pairs = comparisons(runs, reference=True)
    assert pairs["DUO TP2 vs DUO TP1"] == ("DUO TP2", "DUO TP1")
    assert pairs["DUO TP1 PP2 vs DUO TP1"] == ("DUO TP1 PP2", "DUO TP1")
    assert pairs["DUO TP2 ray vs DUO TP1"] == ("DUO TP2 ray", "DUO TP1")
    assert pairs["stock TP2 vs stock TP1 (noise floor)"] == ("stock TP2", "stock TP1")
    assert pairs["DUO-full TP2 vs stock TP2 (all retrieval == stock)"] == ("DUO-full TP2", "stock TP2")
    assert pairs["DUO TP1 vs stock TP1 (the pattern's effect)"] == ("DUO TP1", "stock TP1")
    assert {a for a, b in pairs.values() if b == "reference"} == {"DUO TP1", "DUO TP2", "DUO TP1 PP2", "DUO TP2 ray"}
    # no stock PP2 and no DUO-full at TP 1: those pairs are absent, not compared with something else
    assert not any(b in ("stock TP1 PP2", "DUO-full TP1") for _, b in pairs.values())
    assert all(b != "reference" for _, b in comparisons(runs, reference=False).values())


@pytest.mark.parametrize(("argv", "message"), [
    (["--runs", "DUO TP2,vanilla"], "run 'vanilla'"),
    (["--runs", "DUO TP2,DUO TP2"], "names a run twice"),
    (["--runs", "DUO TP64"], "needs 64 GPU(s)"),
])
def test_bad_arguments_stop_before_any_model_is_loaded(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_tp_check.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
