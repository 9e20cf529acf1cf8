"""The needle check (gate_training.needle) on SmolLM2 with the shipped pattern, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gate_training.config import GateTrainingError
from gate_training.needle import HEAD_SETS, head_sets, main, needle_check

SHIPPED = Path(__file__).resolve().parents[2] / "patterns" / "SmolLM2-135M-Instruct" / "duo_pattern.json"


def test_head_sets_are_complementary_rankings():
    gates = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]], dtype=np.float32)
    sets = head_sets(gates, 0.5)
    assert sets["full"].all() and not sets["all_streaming"].any()
    assert sets["pattern"].tolist() == [[True, False, False], [False, True, True]]
    assert sets["inverse"].tolist() == [[False, True, True], [True, False, False]]


@pytest.mark.slow
def test_shipped_pattern_keeps_the_needles_where_inverse_and_streaming_lose_them(smollm2, tmp_path):
    """At 1K tokens (3x the streaming window) the learned half of the heads keeps the passkeys;
    the other half, or none, loses them. Runs the plain-torch reference, fp32, on CPU."""
    out = tmp_path / "needle.json"
    assert main(["--model", smollm2, "--pattern", str(SHIPPED.parent), "--context", "1024",
                 "--samples", "1", "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["retrieval_heads"] == {"full": 90, "pattern": 45, "inverse": 45, "all_streaming": 0}
    acc = result["token_accuracy"]
    assert set(acc) == set(HEAD_SETS)
    assert acc["full"] > 0.7, acc  # the model can do the task at this length
    assert acc["pattern"] >= acc["full"] - 0.05, acc
    assert acc["inverse"] < acc["full"] - 0.3, acc
    assert acc["all_streaming"] < acc["full"] - 0.3, acc


def test_errors_name_the_fix(smollm2, tiny_model_dirs, tmp_path):
    with pytest.raises(GateTrainingError, match="exceeds the model's 8192 positions"):
        needle_check(smollm2, SHIPPED, context=8192, device="cpu")
    with pytest.raises(GateTrainingError, match="must exceed sink"):
        needle_check(smollm2, SHIPPED, context=300, device="cpu")
    with pytest.raises(GateTrainingError, match="layers"):  # a pattern of another model
        needle_check(tiny_model_dirs["llama"], SHIPPED, context=512, device="cpu")
    with pytest.raises(GateTrainingError, match="at least 1"):
        needle_check(smollm2, SHIPPED, samples=0, device="cpu")
    with pytest.raises(GateTrainingError, match="config.json"):
        needle_check(tmp_path, SHIPPED, device="cpu")
    with pytest.raises(GateTrainingError, match="--haystack .* does not exist"):
        needle_check(smollm2, SHIPPED, context=512, haystack=tmp_path / "absent", device="cpu")
    assert main(["--model", smollm2, "--pattern", str(tmp_path / "missing.json")]) == 2
