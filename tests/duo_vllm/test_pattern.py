"""Tests of duo_vllm.pattern: file formats, binarisation, head mapping, model checks."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duo_vllm.pattern import (
    ORIGINAL_CONFIG_FILENAME,
    ORIGINAL_GATES_FILENAME,
    PATTERN_FILENAME,
    HeadPattern,
    PatternError,
    binarize,
    kv_to_query_heads,
    load_pattern,
    model_fingerprint,
    retrieval_stats,
    save_pattern,
    shard_for_tensor_parallel,
    validate_for_model,
)

ANCHORS = Path(__file__).resolve().parents[3] / "shared/anchors/duo-attention-patterns"
PUBLISHED_SHAPES = {
    "Llama-2-7B-32K-Instruct": (32, 32),
    "Llama-3-8B-Instruct-Gradient-1048k": (32, 8),
    "Llama-3-8B-Instruct-Gradient-4194k": (32, 8),
    "Meta-Llama-3.1-8B-Instruct": (32, 8),
    "Mistral-7B-Instruct-v0.2": (32, 8),
    "Mistral-7B-Instruct-v0.3": (32, 8),
}
needs_anchors = pytest.mark.skipif(
    not ANCHORS.is_dir(), reason=f"published DuoAttention patterns not present at {ANCHORS}"
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies

shapes = st.tuples(st.integers(1, 8), st.integers(1, 8))
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Few distinct values so that ties (common in real patterns: many 0.0 and 1.0) get exercised.
tied_f32 = st.sampled_from([0.0, 0.25, 0.5, 1.0])


@st.composite
def gate_arrays(draw, elements=None):
    shape = draw(shapes)
    elems = elements if elements is not None else st.one_of(finite_f32, tied_f32)
    return draw(hnp.arrays(np.float32, shape, elements=elems))


sparsities = st.floats(0.0, 1.0, allow_nan=False)


def reference_retrieval(gates: np.ndarray, sparsity: float) -> np.ndarray:
    """Independent brute-force statement of the documented rule."""
    flat = [float(x) for x in gates.reshape(-1)]
    n = len(flat)
    n_streaming = math.floor(sparsity * n + 0.5)
    ranked = sorted(range(n), key=lambda i: (-flat[i], i))
    mask = np.zeros(n, dtype=bool)
    mask[ranked[: n - n_streaming]] = True
    return mask.reshape(gates.shape)


def write_original(directory: Path, rows: list[str], config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ORIGINAL_GATES_FILENAME).write_text("\n".join(rows) + "\n")
    if config is not None:
        (directory / ORIGINAL_CONFIG_FILENAME).write_text(json.dumps(config))
    return directory


TRAIN_CONFIG = {
    "model_name": "models/Tiny",
    "sink_size": 4,
    "recent_size": 16,
    "num_steps": 10,
    "lr": 0.02,
    "reg_weight": 0.05,
    "seed": 42,
    "sparsity": None,
}

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


# ---------------------------------------------------------------- our format


@FAST
@given(
    gates=gate_arrays(elements=finite_f32),
    sink=st.one_of(st.none(), st.integers(1, 4096)),
    recent=st.one_of(st.none(), st.integers(1, 65536)),
    sparsity=st.one_of(st.none(), sparsities),
    name=st.one_of(st.none(), st.text(max_size=20)),
)
def test_save_load_round_trip_is_bit_exact(gates, sink, recent, sparsity, name):
    pattern = HeadPattern(
        gates=gates,
        sink_size=sink,
        recent_size=recent,
        model_name=name,
        model_fingerprint="0123456789abcdef",
        sparsity=sparsity,
        provenance={"steps": 3, "losses": [1.5, 0.25], "data": {"name": "x"}, "seed": np.int64(7)},
    )
    with tempfile.TemporaryDirectory() as tmp:
        written = save_pattern(pattern, Path(tmp) / "sub")
        assert written == Path(tmp) / "sub" / PATTERN_FILENAME
        loaded = load_pattern(Path(tmp) / "sub")
    assert loaded.gates.dtype == np.float32
    # bitwise: also distinguishes -0.0 from 0.0
    np.testing.assert_array_equal(loaded.gates.view(np.uint32), gates.view(np.uint32))
    assert loaded.sink_size == sink
    assert loaded.recent_size == recent
    assert loaded.sparsity == sparsity
    assert loaded.model_name == name
    assert loaded.model_fingerprint == "0123456789abcdef"
    assert loaded.provenance == {
        "steps": 3, "losses": [1.5, 0.25], "data": {"name": "x"}, "seed": 7
    }
    assert loaded.source is not None and loaded.source.endswith(PATTERN_FILENAME)


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    p1 = HeadPattern(gates=np.zeros((2, 2)))
    p2 = HeadPattern(gates=np.ones((2, 2)))
    save_pattern(p1, tmp_path)
    with pytest.raises(PatternError, match="overwrite=True"):
        save_pattern(p2, tmp_path)
    np.testing.assert_array_equal(load_pattern(tmp_path).gates, p1.gates)
    save_pattern(p2, tmp_path, overwrite=True)
    np.testing.assert_array_equal(load_pattern(tmp_path).gates, p2.gates)


def test_save_rejects_unserialisable_provenance(tmp_path):
    p = HeadPattern(gates=np.ones((1, 1)), provenance={"obj": object()})
    with pytest.raises(PatternError, match="provenance"):
        save_pattern(p, tmp_path)
    assert not (tmp_path / PATTERN_FILENAME).exists()


def _write_json(path: Path, **overrides) -> Path:
    data = {
        "format": "duo-vllm-pattern",
        "version": 1,
        "model_name": "m",
        "model_fingerprint": None,
        "num_layers": 2,
        "num_kv_heads": 3,
        "gates": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]],
        "sink_size": 4,
        "recent_size": 8,
        "sparsity": 0.5,
        "provenance": {},
    }
    data.update(overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / PATTERN_FILENAME).write_text(json.dumps(data))
    return path / PATTERN_FILENAME


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_layers": 3}, "num_layers"),
        ({"num_kv_heads": 2}, "num_kv_heads"),
        ({"gates": [[0.1, 0.2, 0.3], [0.4, 0.5]]}, "row 1"),
        ({"gates": [[0.1, "x", 0.3], [0.4, 0.5, 0.6]]}, "not a number"),
        ({"gates": [[0.1, float("nan"), 0.3], [0.4, 0.5, 0.6]]}, "layer 0, KV head 1"),
        ({"gates": []}, "empty"),
        ({"format": "something-else"}, "not a duo-vllm pattern"),
        ({"version": 2}, "version"),
        ({"sparsity": 2.0}, "sparsity"),
    ],
)
def test_our_format_errors(tmp_path, overrides, match):
    path = _write_json(tmp_path, **overrides)
    with pytest.raises(PatternError, match=match):
        load_pattern(path)


def test_our_format_invalid_json_names_line(tmp_path):
    (tmp_path / PATTERN_FILENAME).write_text('{\n"format": "duo-vllm-pattern",\n oops\n}')
    with pytest.raises(PatternError, match="line 3"):
        load_pattern(tmp_path)


# ---------------------------------------------------------------- original format


def test_original_format_clips_and_keeps_config(tmp_path):
    write_original(
        tmp_path,
        ["-2.0e-03\t1.0\t5.0e-01", "1.25\t0.0\t-1.5e-05"],
        TRAIN_CONFIG,
    )
    for path in (tmp_path, tmp_path / ORIGINAL_GATES_FILENAME, tmp_path / ORIGINAL_CONFIG_FILENAME):
        p = load_pattern(path)
        np.testing.assert_array_equal(
            p.gates, np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]], dtype=np.float32)
        )
        assert (p.sink_size, p.recent_size) == (4, 16)
        assert p.model_name == "models/Tiny"
        assert p.sparsity is None
        assert p.provenance == TRAIN_CONFIG


def test_directory_prefers_our_format(tmp_path):
    write_original(tmp_path, ["0.0\t0.0"], TRAIN_CONFIG)
    save_pattern(HeadPattern(gates=[[1.0, 0.5]]), tmp_path)
    np.testing.assert_array_equal(load_pattern(tmp_path).gates, [[1.0, 0.5]])


def test_original_to_our_format_conversion_is_lossless(tmp_path):
    write_original(tmp_path / "orig", ["0.123456789\t-0.5", "0.75\t2.0"], TRAIN_CONFIG)
    orig = load_pattern(tmp_path / "orig")
    save_pattern(orig, tmp_path / "ours")
    ours = load_pattern(tmp_path / "ours")
    np.testing.assert_array_equal(ours.gates, orig.gates)
    assert ours.provenance == orig.provenance
    assert (ours.sink_size, ours.recent_size) == (orig.sink_size, orig.recent_size)


def test_tsv_ragged_rows_name_line(tmp_path):
    write_original(tmp_path, ["0.1\t0.2", "", "0.3\t0.4", "0.5"], TRAIN_CONFIG)
    with pytest.raises(PatternError, match=r"line 4: 1 values but line 1 has 2"):
        load_pattern(tmp_path)


def test_tsv_non_number_names_line(tmp_path):
    write_original(tmp_path, ["0.1\t0.2", "0.3\tabc"], TRAIN_CONFIG)
    with pytest.raises(PatternError, match=r"line 2, column 2: 'abc' is not a number"):
        load_pattern(tmp_path)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_tsv_non_finite_is_rejected_before_clipping(tmp_path, bad):
    # clipping would silently turn inf into 1.0
    write_original(tmp_path, ["0.1\t0.2", f"0.3\t{bad}"], TRAIN_CONFIG)
    with pytest.raises(PatternError, match=r"layer 1, KV head 1.*retrain"):
        load_pattern(tmp_path)


def test_tsv_empty_file(tmp_path):
    write_original(tmp_path, [""], TRAIN_CONFIG)
    with pytest.raises(PatternError, match="no gate values"):
        load_pattern(tmp_path)


def test_tsv_without_config_is_rejected(tmp_path):
    write_original(tmp_path, ["0.1\t0.2"], None)
    with pytest.raises(PatternError, match=ORIGINAL_CONFIG_FILENAME):
        load_pattern(tmp_path)


def test_missing_path_and_empty_directory_list_what_was_looked_for(tmp_path):
    for path in (tmp_path / "nope", tmp_path):
        with pytest.raises(PatternError) as info:
            load_pattern(path)
        msg = str(info.value)
        assert PATTERN_FILENAME in msg and ORIGINAL_GATES_FILENAME in msg
        assert str(path) in msg


def test_unknown_file_kind(tmp_path):
    (tmp_path / "gates.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(PatternError, match="don't know how to read"):
        load_pattern(tmp_path / "gates.npy")


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


# ---------------------------------------------------------------- fingerprint

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "head_dim": 128,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 1048576,
    "torch_dtype": "bfloat16",
}


def test_fingerprint_format_and_dict_object_equivalence():
    fp = model_fingerprint(LLAMA)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(SimpleNamespace(**LLAMA)) == fp


def test_fingerprint_ignores_non_shape_fields_and_normalises():
    assert model_fingerprint({**LLAMA, "torch_dtype": "float16", "eos_token_id": 3}) == (
        model_fingerprint(LLAMA)
    )
    assert model_fingerprint({**LLAMA, "rope_theta": 500000}) == model_fingerprint(LLAMA)
    assert model_fingerprint({**LLAMA, "architectures": ["B", "A"]}) == model_fingerprint(
        {**LLAMA, "architectures": ["A", "B"]}
    )


def test_fingerprint_defaults_and_rope_locations():
    explicit = dict(LLAMA)
    implicit = {k: v for k, v in LLAMA.items() if k != "head_dim"}
    assert model_fingerprint(implicit) == model_fingerprint(explicit)
    mha = {**LLAMA, "num_key_value_heads": 32}
    assert model_fingerprint({k: v for k, v in mha.items() if k != "num_key_value_heads"}) == (
        model_fingerprint(mha)
    )
    no_top = {k: v for k, v in LLAMA.items() if k != "rope_theta"}
    nested = {**no_top, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    scaling = {**no_top, "rope_scaling": {"rope_type": "llama3", "rope_theta": 500000.0}}
    assert model_fingerprint(nested) == model_fingerprint(LLAMA)
    assert model_fingerprint(scaling) == model_fingerprint(LLAMA)
    assert model_fingerprint(no_top) != model_fingerprint(LLAMA)


@pytest.mark.parametrize(
    "change",
    [
        {"num_hidden_layers": 31},
        {"num_key_value_heads": 4},
        {"rope_theta": 10000.0},
        {"vocab_size": 32000},
        {"architectures": ["MistralForCausalLM"]},
        {"max_position_embeddings": 8192},
    ],
)
def test_fingerprint_changes_with_shape_fields(change):
    assert model_fingerprint({**LLAMA, **change}) != model_fingerprint(LLAMA)


def test_fingerprint_never_crashes():
    class Weird:
        @property
        def hidden_size(self):
            raise RuntimeError("boom")

    for cfg in ({}, object(), Weird(), {"architectures": 5, "num_attention_heads": 0,
                                        "hidden_size": 10, "rope_scaling": "x"}):
        assert len(model_fingerprint(cfg)) == 16


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


# ---------------------------------------------------------------- published patterns


@needs_anchors
@pytest.mark.parametrize("name", sorted(PUBLISHED_SHAPES))
def test_published_patterns_load(name):
    p = load_pattern(ANCHORS / name)
    assert p.gates.shape == PUBLISHED_SHAPES[name]
    assert np.isfinite(p.gates).all()
    assert p.gates.min() >= 0.0 and p.gates.max() <= 1.0
    assert (p.sink_size, p.recent_size) == (128, 256)
    assert name in (p.model_name or "")
    # raw file does go below 0: clipping really happened
    raw = np.loadtxt(ANCHORS / name / ORIGINAL_GATES_FILENAME, delimiter="\t")
    np.testing.assert_array_equal(p.gates, np.clip(raw, 0, 1).astype(np.float32))


@needs_anchors
def test_published_llama2_at_075_gives_quarter_retrieval():
    p = load_pattern(ANCHORS / "Llama-2-7B-32K-Instruct")
    mask = p.binarize(sparsity=0.75)
    assert int(mask.sum()) == 256
    assert retrieval_stats(mask)["retrieval_fraction"] == 0.25


@needs_anchors
def test_published_llama3_at_05_gives_half_retrieval_varying_per_layer():
    p = load_pattern(ANCHORS / "Llama-3-8B-Instruct-Gradient-1048k")
    mask = p.binarize(sparsity=0.5)
    stats = retrieval_stats(mask)
    assert stats["num_retrieval"] == 128
    assert stats["min_per_layer"] < stats["max_per_layer"]
    # agrees with the reference rule (quantile threshold) wherever it is unambiguous
    q = np.quantile(p.gates, 0.5)
    assert mask[p.gates > q].all()
    assert not mask[p.gates < q].any()
    # TP=2 shards of a real layout still reassemble
    shards = [shard_for_tensor_parallel(mask, 2, r) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), mask)
    assert kv_to_query_heads(mask, 32).sum() == 128 * 4
