"""Tests of duo_vllm.pattern: the pattern object, binarisation, head mapping, model checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duo_vllm.pattern import (
    HeadPattern,
    PatternError,
    binarize,
    kv_to_query_heads,
    retrieval_stats,
    shard_for_tensor_parallel,
    validate_for_model,
)
from tests.duo_vllm.pattern_cases import (
    FAST,
    gate_arrays,
    reference_retrieval,
    sparsities,
)

# ---------------------------------------------------------------- HeadPattern


def test_head_pattern_properties_and_float32():
    p = HeadPattern(gates=[[0.5, 1.0, 0.0], [0.1, 0.2, 0.3]], sink_size=4, recent_size=8)
    assert (p.num_layers, p.num_kv_heads) == (2, 3)
    assert p.gates.dtype == np.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_head_pattern_rejects_non_finite_naming_position(bad):
    gates = np.ones((3, 4), dtype=np.float32)
    gates[2, 1] = bad
    with pytest.raises(PatternError, match=r"layer 2, KV head 1.*retrain"):
        HeadPattern(gates=gates)


@pytest.mark.parametrize(
    "gates", [np.zeros(4), np.zeros((0, 4)), np.zeros((4, 0)), np.zeros((2, 2, 2))]
)
def test_head_pattern_rejects_bad_shapes(gates):
    with pytest.raises(PatternError):
        HeadPattern(gates=gates)


def test_head_pattern_rejects_ragged_and_strings():
    with pytest.raises(PatternError):
        HeadPattern(gates=[[1.0, 2.0], [1.0]])
    with pytest.raises(PatternError):
        HeadPattern(gates=[["a", "b"]])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sink_size": 0},
        {"sink_size": -4},
        {"sink_size": 4.5},
        {"recent_size": True},
        {"recent_size": 0},
        {"sparsity": 1.5},
        {"sparsity": -0.1},
        {"sparsity": float("nan")},
    ],
)
def test_head_pattern_rejects_bad_metadata(kwargs):
    with pytest.raises(PatternError):
        HeadPattern(gates=np.ones((2, 2)), **kwargs)


def test_head_pattern_binarize_uses_default_sparsity_and_explains_missing_one():
    gates = np.arange(8, dtype=np.float32).reshape(2, 4)
    p = HeadPattern(gates=gates, sparsity=0.75)
    np.testing.assert_array_equal(p.binarize(), binarize(gates, sparsity=0.75))
    np.testing.assert_array_equal(p.binarize(sparsity=0.25), binarize(gates, sparsity=0.25))
    np.testing.assert_array_equal(p.binarize(threshold=3.0), gates >= 3.0)
    with pytest.raises(PatternError, match="pass sparsity"):
        HeadPattern(gates=gates).binarize()


# ---------------------------------------------------------------- binarize


@FAST
@given(gates=gate_arrays(), sparsity=sparsities)
def test_binarize_sparsity_matches_documented_rule(gates, sparsity):
    mask = binarize(gates, sparsity=sparsity)
    assert mask.dtype == np.bool_ and mask.shape == gates.shape
    n = gates.size
    assert int(mask.sum()) == n - math.floor(sparsity * n + 0.5)
    np.testing.assert_array_equal(mask, reference_retrieval(gates, sparsity))
    if mask.any() and (~mask).any():
        assert gates[mask].min() >= gates[~mask].max()


@FAST
@given(gates=gate_arrays(), s1=sparsities, s2=sparsities, k=st.integers(0, 8))
def test_binarize_is_monotone_in_sparsity(gates, s1, s2, k):
    k = min(k, gates.shape[1])
    lo, hi = sorted((s1, s2))
    dense = binarize(gates, sparsity=lo, min_retrieval_per_layer=k)
    sparse = binarize(gates, sparsity=hi, min_retrieval_per_layer=k)
    assert not (sparse & ~dense).any(), "retrieval set at higher sparsity must be a subset"


def test_binarize_ties_are_broken_by_index():
    gates = np.zeros((2, 3), dtype=np.float32)
    np.testing.assert_array_equal(
        binarize(gates, sparsity=0.5), [[True, True, True], [False, False, False]]
    )
    gates[1, 2] = 1.0
    np.testing.assert_array_equal(
        binarize(gates, sparsity=0.5), [[True, True, False], [False, False, True]]
    )


@pytest.mark.parametrize(
    ("shape", "sparsity", "retrieval"),
    # sparsity * N exactly halfway: always rounds the streaming count up (not half-even)
    [
        ((1, 5), 0.5, 2),
        ((1, 2), 0.25, 1),
        ((3, 1), 0.5, 1),
        ((32, 32), 0.75, 256),
        ((32, 8), 0.5, 128),
    ],
)
def test_binarize_half_rounds_up(shape, sparsity, retrieval):
    gates = np.linspace(0, 1, math.prod(shape), dtype=np.float32).reshape(shape)
    assert int(binarize(gates, sparsity=sparsity).sum()) == retrieval


def test_binarize_extremes():
    gates = np.random.default_rng(0).random((4, 4), dtype=np.float32)
    assert binarize(gates, sparsity=0.0).all()
    assert not binarize(gates, sparsity=1.0).any()


@FAST
@given(gates=gate_arrays(), t=st.floats(-2.0, 2.0, allow_nan=False))
def test_binarize_threshold(gates, t):
    mask = binarize(gates, threshold=t)
    expected = np.array([[float(g) >= t for g in row] for row in gates])
    np.testing.assert_array_equal(mask, expected)


@FAST
@given(
    gates=gate_arrays(),
    sparsity=sparsities,
    k=st.integers(0, 8),
    use_threshold=st.booleans(),
)
def test_min_retrieval_per_layer(gates, sparsity, k, use_threshold):
    k = min(k, gates.shape[1])
    kwargs = {"threshold": 0.5} if use_threshold else {"sparsity": sparsity}
    base = binarize(gates, **kwargs)
    mask = binarize(gates, min_retrieval_per_layer=k, **kwargs)
    counts = mask.sum(axis=1)
    assert (counts >= k).all()
    assert not (base & ~mask).any(), "promotion must never demote a head"
    for layer in range(gates.shape[0]):
        if base[layer].sum() >= k:
            np.testing.assert_array_equal(mask[layer], base[layer])
        else:
            assert counts[layer] == k
            promoted = mask[layer] & ~base[layer]
            left = ~mask[layer]
            if promoted.any() and left.any():
                assert gates[layer][promoted].min() >= gates[layer][left].max()


def test_min_retrieval_can_exceed_budget():
    gates = np.array([[1.0, 0.9], [0.0, 0.1]], dtype=np.float32)
    assert binarize(gates, sparsity=0.5).sum() == 2
    mask = binarize(gates, sparsity=0.5, min_retrieval_per_layer=1)
    np.testing.assert_array_equal(mask, [[True, True], [False, True]])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"sparsity": 0.5, "threshold": 0.5},
        {"sparsity": -0.01},
        {"sparsity": 1.01},
        {"sparsity": float("nan")},
        {"sparsity": "0.5"},
        {"threshold": float("nan")},
        {"threshold": float("inf")},
        {"sparsity": 0.5, "min_retrieval_per_layer": -1},
        {"sparsity": 0.5, "min_retrieval_per_layer": 5},
        {"sparsity": 0.5, "min_retrieval_per_layer": 1.5},
    ],
)
def test_binarize_bad_arguments(kwargs):
    with pytest.raises(PatternError):
        binarize(np.ones((2, 4), dtype=np.float32), **kwargs)


def test_binarize_error_messages_name_the_fix():
    with pytest.raises(PatternError, match="exactly one of sparsity"):
        binarize(np.ones((2, 2)))
    with pytest.raises(PatternError, match=r"\[0, 1\].*STREAMING"):
        binarize(np.ones((2, 2)), sparsity=2)
    bad = np.ones((2, 2))
    bad[1, 0] = np.nan
    with pytest.raises(PatternError, match="layer 1, KV head 0"):
        binarize(bad, sparsity=0.5)


# ---------------------------------------------------------------- head mapping


@FAST
@given(gates=gate_arrays(), group=st.integers(1, 6), sparsity=sparsities)
def test_kv_to_query_heads(gates, group, sparsity):
    mask = binarize(gates, sparsity=sparsity)
    num_kv = mask.shape[1]
    q = kv_to_query_heads(mask, num_kv * group)
    assert q.shape == (mask.shape[0], num_kv * group) and q.dtype == np.bool_
    for head in range(num_kv * group):
        np.testing.assert_array_equal(q[:, head], mask[:, head // group])
    assert q.sum() == mask.sum() * group


def test_kv_to_query_heads_errors():
    mask = np.zeros((2, 4), dtype=bool)
    for bad in (6, 0, -8, 2):
        with pytest.raises(PatternError, match="multiple"):
            kv_to_query_heads(mask, bad)


@FAST
@given(num_layers=st.integers(1, 4), num_kv=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_tensor_parallel_shards(num_layers, num_kv, data):
    mask = data.draw(hnp.arrays(np.bool_, (num_layers, num_kv)))
    tp = data.draw(st.sampled_from([1, 2, 4, 8, 16]))
    shards = [shard_for_tensor_parallel(mask, tp, r) for r in range(tp)]
    if num_kv >= tp:
        assert all(s.shape == (num_layers, num_kv // tp) for s in shards)
        np.testing.assert_array_equal(np.concatenate(shards, axis=1), mask)
    else:
        replicas = tp // num_kv
        for rank, s in enumerate(shards):
            assert s.shape == (num_layers, 1)
            np.testing.assert_array_equal(s[:, 0], mask[:, rank // replicas])
        # every KV head lives on exactly `replicas` consecutive ranks
        np.testing.assert_array_equal(
            np.concatenate(shards[::replicas], axis=1), mask
        )


def test_tensor_parallel_replication_example():
    mask = np.array([[True, False]])
    got = [shard_for_tensor_parallel(mask, 4, r)[0, 0] for r in range(4)]
    assert got == [True, True, False, False]


@pytest.mark.parametrize(
    ("num_kv", "tp", "rank"),
    [(8, 3, 0), (2, 3, 0), (4, 6, 0), (8, 2, 2), (8, 2, -1), (8, 0, 0), (8, 2.0, 0)],
)
def test_tensor_parallel_errors(num_kv, tp, rank):
    with pytest.raises(PatternError):
        shard_for_tensor_parallel(np.zeros((2, num_kv), dtype=bool), tp, rank)


# ---------------------------------------------------------------- validate_for_model


def test_validate_for_model():
    p = HeadPattern(gates=np.ones((32, 8)), model_name="models/Llama-3-8B", model_fingerprint="aa")
    validate_for_model(
        p, num_layers=32, num_kv_heads=8, fingerprint="aa", model_name="x/llama-3-8b"
    )
    validate_for_model(p, num_layers=32, num_kv_heads=8)  # unknown fingerprint: shape only
    validate_for_model(
        HeadPattern(gates=np.ones((32, 8))), num_layers=32, num_kv_heads=8, fingerprint="bb"
    )
    for layers, heads in ((32, 32), (40, 8)):
        with pytest.raises(PatternError) as info:
            validate_for_model(p, num_layers=layers, num_kv_heads=heads, model_name="served/M")
        msg = str(info.value)
        assert "32 layers x 8 KV heads" in msg and f"{layers} layers x {heads} KV heads" in msg
        assert "models/Llama-3-8B" in msg and "another model" in msg
        assert "gate_training" in msg and "--additional-config" in msg
    with pytest.raises(PatternError, match="fingerprint"):
        validate_for_model(p, num_layers=32, num_kv_heads=8, fingerprint="bb")


# ---------------------------------------------------------------- stats


def test_retrieval_stats():
    mask = np.array(
        [[True, False, False], [True, True, True], [False, False, False], [True, True, False]]
    )
    s = retrieval_stats(mask)
    assert s["per_layer"] == [1, 3, 0, 2]
    assert (s["min_per_layer"], s["max_per_layer"]) == (0, 3)
    assert s["mean_per_layer"] == pytest.approx(1.5)
    assert s["num_retrieval"] == 6 and s["num_heads"] == 12
    assert s["retrieval_fraction"] == pytest.approx(0.5)
    json.dumps(s)  # loggable as JSON
    with pytest.raises(PatternError, match="boolean"):
        retrieval_stats(mask.astype(np.float32))


