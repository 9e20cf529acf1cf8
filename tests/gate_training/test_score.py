"""Training-free head scores (``python -m gate_training score``): the measurement on hand-built
attention, the options' errors, and the whole command on SmolLM2 against its trained pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duo_vllm.pattern_io import load_pattern
from gate_training.config import GateTrainingError
from gate_training.score import ScoreConfig, _Probe, agreement, main, score_heads

SHIPPED_SMOLLM2 = "patterns/SmolLM2-135M-Instruct"


def _one_hot_attention(num_tokens: int, distance: int, rows: torch.Tensor, dim: int = 128):
    """Query heads 0/1 share KV head 0, heads 2/3 KV head 1. Keys are near-orthogonal; head 0's
    queries point at their echo token (distance back), head 1's at their induction token, heads 2
    and 3 at themselves (local)."""
    torch.manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(2, num_tokens, dim), dim=-1) * 8
    query = torch.zeros(1, 4, num_tokens, dim)
    query[0, 0, rows] = keys[0, rows - distance]
    query[0, 1, rows] = keys[0, rows - distance + 1]
    query[0, 2, rows] = keys[1, rows]
    query[0, 3, rows] = keys[1, rows]
    return query, keys[None]


def test_probe_finds_copy_heads_and_leaves_local_heads():
    distance, rows = 300, torch.arange(320, 600, 7)
    query, key = _one_hot_attention(600, distance, rows)
    probe = _Probe(num_layers=1, num_q_heads=4, sink=4, recent=32)
    probe.start(rows, distance)
    probe.observe(0, query, key, scale=1.0)
    copy, far = probe.kv_scores(num_kv_heads=2)
    assert copy[0, 0] > 0.95 and far[0, 0] > 0.95, (copy, far)  # copies from 300 tokens back
    assert copy[0, 1] < 0.05 and far[0, 1] < 0.05, (copy, far)  # attends within its window
    per_q = probe.copy_mass[0] / probe.count[0]
    assert per_q[0] > 0.95 and per_q[1] > 0.95  # echo and induction both count


def test_probe_refuses_layers_it_never_saw():
    probe = _Probe(num_layers=2, num_q_heads=2, sink=4, recent=8)
    probe.count[0] = 1
    with pytest.raises(GateTrainingError, match=r"layers \[1\] never called the scoring attention"):
        probe.kv_scores(num_kv_heads=1)


@pytest.mark.parametrize("overrides,message", [
    ({"lengths": [512]}, r"--lengths 512 is too short.*use --lengths >= 642"),
    ({"lengths": []}, r"--lengths must be positive"),
    ({"samples": 0}, r"--samples must be >= 1"),
    ({"sparsity": 1.5}, r"--sparsity must lie in \[0, 1\]"),
    ({"sparsity": float("nan")}, r"--sparsity must lie in \[0, 1\]"),
    ({"recent": 0}, r"--recent >= 1"),
    ({"dtype": "int8"}, r"--dtype must be one of"),
])
def test_bad_options_name_the_fix(overrides, message, tmp_path):
    cfg = ScoreConfig(model="unused", out=str(tmp_path / "out"), **overrides)
    with pytest.raises(GateTrainingError, match=message):
        cfg.check()


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(GateTrainingError, match="--overwrite"):
        ScoreConfig(model="unused", out=str(tmp_path / "out")).check()


def test_longer_than_the_model_and_missing_model_are_refused(tiny_model_dirs, tmp_path):
    with pytest.raises(GateTrainingError, match="max_position_embeddings"):
        score_heads(ScoreConfig(model=tiny_model_dirs["llama"], out=str(tmp_path / "a"), lengths=[4096]))
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "b"), "--no-progress"]) == 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3moe", "llama31"])
def test_tiny_models_are_scored_reproducibly(tiny_model_dirs, tmp_path, family):
    cfg = dict(model=tiny_model_dirs[family], lengths=[800], samples=1, queries=32, sink=4, recent=64)
    first = score_heads(ScoreConfig(out=str(tmp_path / "a"), **cfg), progress=False)
    again = score_heads(ScoreConfig(out=str(tmp_path / "b"), **cfg), progress=False)
    assert first["gates"].shape == (2, 2)
    assert np.all((first["gates"] >= 0) & (first["gates"] <= 1))
    np.testing.assert_array_equal(first["gates"], again["gates"])


def test_smollm2_scores_agree_with_its_trained_pattern(smollm2, tmp_path, capsys):
    """The command end to end: a pattern the plugin loads, its provenance, and heads that mostly
    match the trained ones (82% of 45 measured; a random ranking shares 50% on average)."""
    out = tmp_path / "scored"
    code = main([smollm2, "--out", str(out), "--lengths", "1024", "--samples", "1", "--queries", "128",
                 "--sink", "16", "--recent", "64", "--compare", SHIPPED_SMOLLM2, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    pattern = load_pattern(out)
    assert pattern.gates.shape == (30, 3) and (pattern.sink_size, pattern.recent_size) == (16, 64)
    provenance = pattern.provenance
    assert provenance["method"].startswith("training-free head scores")
    assert provenance["settings"]["lengths"] == [1024]
    shared = provenance["agreement"]
    assert shared["retrieval_heads"] == 45 and shared["shared_retrieval_heads"] >= 34, shared
    assert shared["rank_correlation"] > 0.6, shared
    assert "agreement with" in capsys.readouterr().out
    # the same numbers from the helper, and a mismatched shape is refused
    again = agreement(pattern.gates, SHIPPED_SMOLLM2, 0.5)
    assert again["shared_retrieval_heads"] == shared["shared_retrieval_heads"]
    with pytest.raises(GateTrainingError, match="same model"):
        agreement(pattern.gates[:2], SHIPPED_SMOLLM2, 0.5)


def test_bad_compare_path_fails_before_scoring(smollm2, tmp_path, capsys):
    code = main([smollm2, "--out", str(tmp_path / "o"), "--compare", str(tmp_path / "nowhere"), "--no-progress"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_entry_dispatches_score(tmp_path, capsys):
    from gate_training.__main__ import main as cli

    with pytest.raises(SystemExit) as exc:
        cli(["score", "--help"])
    assert exc.value.code == 0
    assert "--lengths" in capsys.readouterr().out
