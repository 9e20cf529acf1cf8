"""Tests of duo_vllm.pattern_io: our format and the original DuoAttention files, and the published patterns."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from duo_vllm.pattern import (
    HeadPattern,
    PatternError,
    kv_to_query_heads,
    retrieval_stats,
    shard_for_tensor_parallel,
)
from duo_vllm.pattern_io import (
    ORIGINAL_CONFIG_FILENAME,
    ORIGINAL_GATES_FILENAME,
    PATTERN_FILENAME,
    load_pattern,
    save_pattern,
)
from tests.duo_vllm.pattern_cases import (
    ANCHORS,
    FAST,
    PUBLISHED_SHAPES,
    TRAIN_CONFIG,
    finite_f32,
    gate_arrays,
    needs_anchors,
    sparsities,
    write_original,
)

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

