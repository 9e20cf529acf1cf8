"""Gate statistics written with a pattern: how clearly the gates separate at the deployment cut."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gate_training.export import UNSETTLED_BAND, cut_stats, gate_stats, unsettled_warning


def test_bunched_gates_warn_and_polarised_gates_do_not():
    # 400 steps with a weak regulariser: almost every gate within a hair of 1
    bunched = np.concatenate([np.linspace(0.80, 0.97, 8), np.linspace(0.995, 1.0, 40)]).reshape(24, 2)
    stats = gate_stats(bunched, 0.5)
    assert stats["cut_at_sparsity"]["gap"] < 1e-3 and stats["cut_at_sparsity"]["heads_within_band"] >= 20
    message = unsettled_warning(stats)
    assert message and "--reg-weight" in message and "--steps" in message
    polarised = np.concatenate([np.zeros(20), np.linspace(0.3, 0.7, 8), np.ones(20)]).reshape(24, 2)
    stats = gate_stats(polarised, 0.5)
    assert stats["cut_at_sparsity"]["heads_within_band"] <= 1 and unsettled_warning(stats) is None


def test_warning_suggests_a_weight_scaled_by_the_hidden_states():
    bunched = gate_stats(np.concatenate([np.linspace(0.8, 0.97, 8), np.linspace(0.995, 1.0, 40)]).reshape(24, 2), 0.5)
    qwen = unsettled_warning(bunched, reg_weight=0.05, hidden_mean_square=43.0)
    assert "mean square 43.0" in qwen and "--reg-weight 0.57 matches" in qwen
    assert "train longer" in unsettled_warning(bunched, reg_weight=0.6, hidden_mean_square=43.0)


def test_no_cut_when_every_head_is_on_one_side():
    gates = np.full((4, 2), 0.5)
    assert cut_stats(gates, 0) is None and cut_stats(gates, 8) is None
    assert unsettled_warning(gate_stats(gates, 0.0)) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=4, max_size=64), st.integers(1, 63))
def test_cut_stats_agree_with_a_direct_count(values, k):
    gates = np.asarray(values)
    k = min(k, gates.size - 1)
    stats = cut_stats(gates, k)
    ranked = sorted(values, reverse=True)
    assert np.isclose(stats["gap"], ranked[k - 1] - ranked[k], atol=1e-6) and stats["gap"] >= 0
    cut = (ranked[k - 1] + ranked[k]) / 2
    assert stats["heads_within_band"] == sum(abs(v - cut) <= UNSETTLED_BAND for v in values)
