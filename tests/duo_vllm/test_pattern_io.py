"""Tests of duo_vllm.pattern_io: our format, the original DuoAttention files, PruLong's masks.tsv, and the published patterns."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duo_vllm.pattern import (
    HeadPattern,
    PatternError,
    kv_to_query_heads,
    retrieval_stats,
    shard_for_tensor_parallel,
)
from duo_vllm.pattern_formats import (
    FORMAT_DUO_VLLM_JSON,
    FORMAT_DUOATTENTION_TSV,
    FORMAT_PRULONG_MASKS,
)
from duo_vllm.pattern_io import (
    ORIGINAL_CONFIG_FILENAME,
    ORIGINAL_GATES_FILENAME,
    PATTERN_FILENAME,
    PRULONG_MASKS_FILENAME,
    find_pattern_file,
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



# ---------------------------------------------------------------- PruLong masks.tsv


def _sha12(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _write_masks(directory: Path, text: str, name: str = PRULONG_MASKS_FILENAME) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(text.encode("utf-8"))
    return directory / name


def test_masks_tsv_loads_as_a_hard_pattern(tmp_path):
    # csv.writer (what PruLong's save_prulong_masks.py uses) ends rows with \r\n; 0/1 in any spelling
    path = _write_masks(tmp_path, "1.0\t0.0\t1\r\n0\t0.0\t1.0 \r\n\n  \n")
    for target in (tmp_path, path):
        p = load_pattern(target)
        np.testing.assert_array_equal(p.gates, [[1, 0, 1], [0, 0, 1]])
        assert p.gates.dtype == np.float32
        assert (p.sink_size, p.recent_size) == (None, None), "masks.tsv records no window"
        assert p.sparsity == 0.5, "the mask's own split: 3 of 6 heads stream"
        assert p.source == str(path)
        assert p.source_format == FORMAT_PRULONG_MASKS
        assert p.content_hash == _sha12(path)
        np.testing.assert_array_equal(p.binarize(), p.gates == 1)


def test_masks_tsv_ignores_the_model_config_beside_it(tmp_path):
    """PruLong writes masks.tsv into the checkpoint folder, where config.json is the model's."""
    _write_masks(tmp_path, "1\t0\n0\t1\n")
    (tmp_path / ORIGINAL_CONFIG_FILENAME).write_text(json.dumps({"model_type": "llama", "sink_size": 7}))
    p = load_pattern(tmp_path)
    assert p.source_format == FORMAT_PRULONG_MASKS and p.sink_size is None


def test_rounded_masks_file_loads_by_path_and_is_named_from_its_folder(tmp_path):
    path = _write_masks(tmp_path, "1\t0\n", name="masks_sp0.5.tsv")
    assert load_pattern(path).source_format == FORMAT_PRULONG_MASKS
    with pytest.raises(PatternError, match=r"masks_sp0\.5\.tsv"):
        load_pattern(tmp_path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1\t0\t1\n0\t1\n", r"line 2: 2 values but line 1 has 3; every layer row needs one value per KV head"),
        ("1\t0\n\n1\t0\t0\n", r"line 3: 3 values but line 1 has 2"),
        ("1\t0.5\n", r"line 1, column 2: '0.5' is not 0 or 1.*full_attention_heads.tsv"),
        ("1\t0\n2\t0\n", r"line 2, column 1: '2' is not 0 or 1"),
        ("1\t-1\n", r"column 2: '-1' is not 0 or 1"),
        ("1\tabc\n", r"column 2: 'abc' is not 0 or 1"),
        ("1\t\t0\n", r"column 2: '' is not 0 or 1"),
        ("1\tnan\n", r"column 2: 'nan' is not 0 or 1"),
        ("NaN\t1\n", r"column 1: 'NaN' is not 0 or 1"),
        ("1\tinf\n", r"'inf' is not 0 or 1"),
        ("", r"holds no mask rows \(empty file\)"),
        ("\n  \n\t\n", r"holds no mask rows"),
    ],
)
def test_masks_tsv_errors_name_the_place_and_the_fix(tmp_path, text, match):
    _write_masks(tmp_path, text)
    with pytest.raises(PatternError, match=match) as info:
        load_pattern(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / PRULONG_MASKS_FILENAME) in message
    assert "save_prulong_masks.py" in message, "every refusal names how to get a good file"


def test_masks_tsv_not_utf8(tmp_path):
    (tmp_path / PRULONG_MASKS_FILENAME).write_bytes(b"1\t\xff\n")
    with pytest.raises(PatternError, match="not UTF-8"):
        load_pattern(tmp_path)


def test_renamed_mask_without_config_points_at_the_name(tmp_path):
    (tmp_path / "llama_mask.tsv").write_text("1\t0\n")
    with pytest.raises(PatternError, match="name it masks.tsv"):
        load_pattern(tmp_path / "llama_mask.tsv")


mask_arrays = st.tuples(st.integers(1, 12), st.integers(1, 8)).flatmap(
    lambda shape: hnp.arrays(np.bool_, shape))


@FAST
@given(mask=mask_arrays, spellings=st.sampled_from([("0", "1"), ("0.0", "1.0"), ("0", "1.0")]),
       newline=st.sampled_from(["\n", "\r\n"]), tail=st.sampled_from(["", "\n", "\n\n", " \n \t"]))
def test_random_masks_round_trip_and_binarize_to_themselves(mask, spellings, newline, tail):
    text = newline.join("\t".join(spellings[int(v)] for v in row) for row in mask) + tail
    with tempfile.TemporaryDirectory() as tmp:
        p = load_pattern(_write_masks(Path(tmp), text))
    np.testing.assert_array_equal(p.gates, mask.astype(np.float32))
    assert p.sparsity == (~mask).sum() / mask.size
    np.testing.assert_array_equal(p.binarize(), mask)  # at its own sparsity
    np.testing.assert_array_equal(p.binarize(sparsity=p.sparsity), mask)
    np.testing.assert_array_equal(p.binarize(threshold=0.5), mask)


# ---------------------------------------------------------------- which file a folder offers


def test_directory_preference_order(tmp_path):
    _write_masks(tmp_path, "0\t0\n")
    assert find_pattern_file(tmp_path).name == PRULONG_MASKS_FILENAME
    assert load_pattern(tmp_path).source_format == FORMAT_PRULONG_MASKS
    write_original(tmp_path, ["0.25\t0.75"], TRAIN_CONFIG)
    assert find_pattern_file(tmp_path).name == ORIGINAL_GATES_FILENAME
    assert load_pattern(tmp_path).source_format == FORMAT_DUOATTENTION_TSV
    save_pattern(HeadPattern(gates=[[1.0, 0.5]]), tmp_path)
    assert find_pattern_file(tmp_path).name == PATTERN_FILENAME
    assert load_pattern(tmp_path).source_format == FORMAT_DUO_VLLM_JSON
    assert find_pattern_file(tmp_path / "nothing-here") is None


def test_every_format_records_its_file_digest(tmp_path):
    ours = save_pattern(HeadPattern(gates=[[1.0, 0.5]]), tmp_path / "ours")
    orig = write_original(tmp_path / "orig", ["0.25\t0.75"], TRAIN_CONFIG) / ORIGINAL_GATES_FILENAME
    masks = _write_masks(tmp_path / "masks", "0\t1\n")
    for path, fmt in ((ours, FORMAT_DUO_VLLM_JSON), (orig, FORMAT_DUOATTENTION_TSV), (masks, FORMAT_PRULONG_MASKS)):
        p = load_pattern(path.parent)
        assert (p.source_format, p.content_hash) == (fmt, _sha12(path))
        assert fmt in p.describe() and _sha12(path) in p.describe()
    before = load_pattern(masks).content_hash
    masks.write_text("1\t1\n")
    assert load_pattern(masks).content_hash != before, "the digest follows the content"


def test_gates_beside_a_model_config_carry_no_training_record(tmp_path):
    """full_attention_heads.tsv dropped into a model folder: its config.json describes the model."""
    write_original(tmp_path, ["0.25\t0.75"], {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    p = load_pattern(tmp_path)
    assert (p.sink_size, p.recent_size, p.sparsity, p.model_name) == (None, None, None, None)
    assert p.provenance == {} and p.source_format == FORMAT_DUOATTENTION_TSV


mask_cells = st.sampled_from(["0", "1", "0.0", "1.0", "1e0", "-0", "0.5", "2", "nan", "inf", "", "x", " "])


@FAST
@given(data=st.one_of(
    st.lists(st.lists(mask_cells, max_size=4).map("\t".join), max_size=5).map("\n".join).map(str.encode),
    st.text(max_size=60).map(str.encode), st.binary(max_size=60)))
def test_any_masks_file_loads_or_is_refused_in_one_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / PRULONG_MASKS_FILENAME).write_bytes(data)
        try:
            p = load_pattern(tmp)
        except PatternError as error:
            assert "\n" not in str(error).strip()
            return
    assert set(np.unique(p.gates)) <= {0.0, 1.0} and p.gates.ndim == 2 and p.gates.size > 0
    assert p.sparsity == float((p.gates == 0).mean())
    np.testing.assert_array_equal(p.binarize(), p.gates == 1)
