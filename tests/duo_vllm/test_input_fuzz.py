"""Fuzzing the two readers of user input: head-pattern files (``duo_vllm.pattern_io.load_pattern``)
and DUO options (``duo_vllm.config.DuoConfig.from_additional_config``).

Each documents one error type (``PatternError`` for patterns, ``DuoConfigError`` for options; both
``ValueError``), raised "with a single message that says what is wrong and how to fix it, so that it
can be shown to the user verbatim at engine start-up". Whatever the input, only that error may escape, its message is one non-empty
line, and what is accepted is usable: finite float32 gates of the declared shape, validated
options.

Every fuzz target runs its examples through a checker that records the outcome, and then asserts
that both outcomes (accepted and refused) were reached, so a strategy that never got past the first
check of the parser would fail here instead of passing silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from duo_vllm.config import DuoConfig, DuoConfigError
from duo_vllm.pattern import HeadPattern, PatternError
from duo_vllm.pattern_io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ORIGINAL_CONFIG_FILENAME,
    ORIGINAL_GATES_FILENAME,
    PATTERN_FILENAME,
    load_pattern,
)

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])
OPTION_NAMES = [f.name for f in dataclasses.fields(DuoConfig)]
PATTERN_KEYS = ["format", "version", "num_layers", "num_kv_heads", "gates", "sink_size", "recent_size",
                "sparsity", "model_name", "model_fingerprint", "provenance"]


def test_the_documented_errors_are_value_errors():
    """vLLM reports a ValueError from argument handling as bad input, not as a crash."""
    assert issubclass(PatternError, ValueError) and issubclass(DuoConfigError, ValueError)


def _assert_one_line(error: BaseException) -> str:
    message = str(error)
    assert message.strip(), f"empty message from {type(error).__name__}"
    assert len(message.strip().splitlines()) == 1, f"message is not one line: {message!r}"
    return message


# ============================================================================ pattern loader

def _assert_valid_pattern(pattern: HeadPattern, declared: dict | None = None) -> None:
    assert isinstance(pattern, HeadPattern)
    gates = pattern.gates
    assert isinstance(gates, np.ndarray) and gates.dtype == np.float32 and gates.ndim == 2
    assert gates.shape[0] >= 1 and gates.shape[1] >= 1
    assert np.isfinite(gates).all()
    assert (pattern.num_layers, pattern.num_kv_heads) == gates.shape
    for size in (pattern.sink_size, pattern.recent_size):
        assert size is None or (type(size) is int and size > 0)
    assert pattern.sparsity is None or (type(pattern.sparsity) is float and 0.0 <= pattern.sparsity <= 1.0)
    assert isinstance(pattern.provenance, dict)
    for text in (pattern.model_name, pattern.model_fingerprint, pattern.source):
        assert text is None or isinstance(text, str)
    for key, size in (("num_layers", gates.shape[0]), ("num_kv_heads", gates.shape[1])):
        if declared and declared.get(key) is not None:
            assert declared[key] == size


def _load_checked(path: str | Path, declared: dict | None = None) -> str:
    """Load ``path``: "ok" (a valid pattern) or "refused" (PatternError, one line). Any other
    exception propagates and fails the test."""
    try:
        pattern = load_pattern(path)
    except PatternError as error:
        _assert_one_line(error)
        return "refused"
    _assert_valid_pattern(pattern, declared)
    return "ok"


def _write(folder: Path, name: str, content: bytes | str) -> Path:
    target = folder / name
    if isinstance(content, str):
        target.write_bytes(content.encode("utf-8"))
    else:
        target.write_bytes(content)
    return target


GOOD_CONFIG = json.dumps({"sink_size": 64, "recent_size": 256, "sparsity": 0.5, "model_name": "m"})
GOOD_TSV = "0.1\t0.9\t0.5\n0.2\t-0.01\t1.02\n"
GOOD_OURS = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_layers": 2, "num_kv_heads": 2,
                        "gates": [[0.1, 0.9], [0.5, 0.25]], "sink_size": 64, "recent_size": 256,
                        "sparsity": 0.5, "model_name": "m", "model_fingerprint": None, "provenance": {}})

# Numbers a hand-edited or corrupted file or option may hold: JSON integers beyond float range
# (10**400 is a valid JSON literal), negatives, zero, non-finite floats.
huge_ints = st.sampled_from([10**20, 2**63, 2**64 + 1, 10**400, -(10**400)])
numbers = st.one_of(st.integers(-(10**6), 10**6), st.floats(), huge_ints,
                    st.sampled_from([0, -1, 1, 0.5, 1.5, -0.0, float("nan"), float("inf"), -float("inf")]))
weird_strings = st.one_of(st.text(max_size=12),
                          st.sampled_from(["NaN", "nan", "inf", "-Infinity", "1e999", "0.5", "64", "", " ",
                                           "null", "true", "[0.5]", "\n", "x\ny"]))
json_scalars = st.one_of(st.none(), st.booleans(), numbers, weird_strings)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
# Replacement values for one field: half of them the numbers most likely to slip through a check.
tricky_numbers = st.sampled_from([10**400, -(10**400), 2**64 + 1, float("nan"), float("inf"), -float("inf"),
                                  -1, 0, 1.5, 1e308, 5e-324, True, "0.5", [0.5]])
field_values = st.one_of(tricky_numbers, json_values)


@st.composite
def gates_values(draw):
    """Plausible gate tables, often subtly wrong: ragged rows, a row that is not a list, a value
    that is not a number, extra nesting, empty rows, huge or non-finite values."""
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 4))
    table = [[draw(st.floats(0, 1)) for _ in range(cols)] for _ in range(rows)]
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["value", "ragged", "row", "nest", "empty_row", "empty", "flat"]))
        rows_ok = isinstance(table, list) and len(table) > 0
        i = draw(st.integers(0, len(table) - 1)) if rows_ok else 0
        row = table[i] if rows_ok and isinstance(table[i], list) else None
        if kind == "value" and row:
            row[draw(st.integers(0, len(row) - 1))] = draw(field_values)
        elif kind == "ragged" and row is not None:
            table[i] = row + [0.5] if draw(st.booleans()) else row[:-1]
        elif kind == "row" and rows_ok:
            table[i] = draw(json_scalars)
        elif kind == "nest":
            table = [table]
        elif kind == "empty_row" and rows_ok:
            table[i] = []
        elif kind == "empty":
            table = []
        elif kind == "flat" and rows_ok:
            table = table[0]
    return table


@st.composite
def plausible_pattern_dicts(draw):
    """Our format's fields with a few of them dropped or replaced by wrong values."""
    data = json.loads(GOOD_OURS)
    data["gates"] = draw(gates_values())
    if isinstance(data["gates"], list) and data["gates"] and all(isinstance(r, list) for r in data["gates"]):
        data["num_layers"] = len(data["gates"])
        data["num_kv_heads"] = len(data["gates"][0])
    for key in draw(st.lists(st.sampled_from(PATTERN_KEYS), max_size=3, unique=True)):
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(field_values)
    return data


@FUZZ
@given(content=st.binary(max_size=300))
@example(content=GOOD_OURS.encode())
@example(content=GOOD_OURS.encode()[: len(GOOD_OURS) // 2])
@example(content=b"[" * 5000)  # nesting deeper than Python's recursion limit
@example(content=b'{"format": ' + b"1" * 5000 + b"}")  # an integer literal over Python's 4300 digits
def _bytes_as_our_file(outcomes, content):
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), PATTERN_FILENAME, content)
        outcomes[_load_checked(tmp)] += 1


@FUZZ
@given(value=json_values)
@example(value=json.loads(GOOD_OURS))
def _json_value_as_our_file(outcomes, value):
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), PATTERN_FILENAME, json.dumps(value))
        outcomes[_load_checked(tmp)] += 1


@FUZZ
@given(data=plausible_pattern_dicts(), as_file=st.booleans())
@example(data={**json.loads(GOOD_OURS), "gates": [[10**400, 0.5], [0.5, 0.5]]}, as_file=False)
@example(data={**json.loads(GOOD_OURS), "sparsity": 10**400}, as_file=False)
def _plausible_dict_as_our_file(outcomes, data, as_file):
    with tempfile.TemporaryDirectory() as tmp:
        target = _write(Path(tmp), PATTERN_FILENAME, json.dumps(data))
        outcomes[_load_checked(target if as_file else tmp, data)] += 1


tsv_cells = st.one_of(st.floats(-2, 2).map(repr), st.integers(-3, 3).map(str),
                      st.sampled_from(["nan", "inf", "-inf", "1e400", "", "x", "0.5.5", "1,5", "#", "0x1", "1_0"]),
                      st.text(max_size=4))


@st.composite
def tsv_texts(draw):
    """Rows of tab- (or space-) separated cells, mostly numbers, with comments and blank lines."""
    cols = draw(st.integers(1, 4))
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        n = cols if draw(st.integers(0, 4)) else draw(st.integers(0, 5))
        sep = draw(st.sampled_from(["\t", "\t", " ", "  "]))
        line = sep.join(draw(tsv_cells) for _ in range(n))
        if draw(st.integers(0, 5)) == 0:
            line += " # comment"
        lines.append(line)
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))


@FUZZ
@given(tsv=st.one_of(tsv_texts(), st.text(max_size=80), st.binary(max_size=80)),
       config=st.one_of(st.just(GOOD_CONFIG), st.just("{}"), st.text(max_size=40), st.binary(max_size=40),
                        st.dictionaries(st.sampled_from(["sink_size", "recent_size", "sparsity", "model_name",
                                                         "other"]), field_values, max_size=4).map(json.dumps),
                        json_values.map(json.dumps)),
       point_at=st.sampled_from(["folder", "tsv", "config"]))
@example(tsv=GOOD_TSV, config=GOOD_CONFIG, point_at="folder")
@example(tsv="0.1\t0.2\n0.3\n", config=GOOD_CONFIG, point_at="tsv")
@example(tsv=GOOD_TSV, config='{"sparsity": 1' + "0" * 400 + "}", point_at="folder")
@example(tsv=GOOD_TSV, config="[" * 5000, point_at="config")
def _original_format(outcomes, tsv, config, point_at):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tsv_path = _write(folder, ORIGINAL_GATES_FILENAME, tsv)
        config_path = _write(folder, ORIGINAL_CONFIG_FILENAME, config)
        target = {"folder": folder, "tsv": tsv_path, "config": config_path}[point_at]
        try:
            pattern = load_pattern(target)
        except PatternError as error:
            _assert_one_line(error)
            outcomes["refused"] += 1
            return
        _assert_valid_pattern(pattern)
        assert ((pattern.gates >= 0) & (pattern.gates <= 1)).all(), "original gates are clipped to [0, 1]"
        outcomes["ok"] += 1


# What a user may type as the "pattern" option: names (resolved under a temporary folder here, never
# above it), "~user/..." forms, names too long for the file system, odd characters. Line breaks are
# left out: messages quote the path as given.
path_texts = st.one_of(
    st.text(max_size=30).filter(lambda s: ".." not in s),
    st.text(max_size=10).map(lambda s: "~" + s),
    st.integers(250, 5000).map(lambda n: "p" * n),
    st.sampled_from(["", ".", "/", "x.json", "x.tsv", "config.json", PATTERN_FILENAME, "a\0b"]),
)


@FUZZ
@given(name=path_texts)
@example(name="good")
@example(name="~nosuchuser-duo/p")
@example(name="p" * 5000)
@example(name="~\0")
def _pattern_paths(outcomes, name):
    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "good"
        good.mkdir()
        _write(good, PATTERN_FILENAME, GOOD_OURS)
        name = "".join(name.splitlines())
        path = name if name.startswith("~") else f"{tmp}/{name}"
        outcomes[_load_checked(path)] += 1


@pytest.mark.parametrize("target", [_bytes_as_our_file, _json_value_as_our_file, _plausible_dict_as_our_file,
                                    _original_format, _pattern_paths], ids=lambda f: f.__name__.strip("_"))
def test_pattern_loader_fuzz(target):
    outcomes = Counter()
    target(outcomes)
    assert outcomes["ok"] and outcomes["refused"], f"the fuzz missed a path of the loader: {dict(outcomes)}"


def test_loader_checker_sees_both_outcomes():
    """The checker itself: a valid file is accepted, a broken one refused, a crash propagates."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write(folder, PATTERN_FILENAME, GOOD_OURS)
        assert _load_checked(folder, json.loads(GOOD_OURS)) == "ok"
        _write(folder, PATTERN_FILENAME, GOOD_OURS[:-3])
        assert _load_checked(folder) == "refused"
        _write(folder, PATTERN_FILENAME, GOOD_OURS)
        with pytest.raises(AssertionError):
            _load_checked(folder, {"num_layers": 3})  # a shape other than the declared one fails


# Inputs the fuzz crashed the loader with (OverflowError, RecursionError, a plain ValueError,
# OSError, RuntimeError) before duo_vllm.pattern turned them into PatternError; "@" is the folder.
LOADER_CRASHES = {
    "gate_beyond_float": ({PATTERN_FILENAME: GOOD_OURS.replace("0.1", "1" + "0" * 400)}, "@",
                          ("invalid gates (int too large to convert to float)", "regenerate the file")),
    "sparsity_beyond_float": ({PATTERN_FILENAME: GOOD_OURS.replace('"sparsity": 0.5', '"sparsity": 1' + "0" * 400)},
                              "@", ("pattern sparsity must be a number in [0, 1]", "e.g. 0.5")),
    "tsv_config_sparsity_beyond_float": ({ORIGINAL_GATES_FILENAME: GOOD_TSV,
                                          ORIGINAL_CONFIG_FILENAME: '{"sparsity": -1' + "0" * 400 + "}"}, "@",
                                         ("sparsity in", "must be a number in [0, 1]")),
    "nesting_too_deep": ({PATTERN_FILENAME: "[" * 5000}, "@",
                         ("is not usable JSON (a number with too many digits or nesting too deep: RecursionError)",
                          "fix or regenerate the file")),
    "integer_over_4300_digits": ({ORIGINAL_GATES_FILENAME: GOOD_TSV, ORIGINAL_CONFIG_FILENAME: "1" * 5000}, "@",
                                 ("config.json is not usable JSON", "fix or regenerate the file")),
    "home_of_unknown_user": ({}, "~nosuchuser-duo/p", ("'~nosuchuser-duo/p' cannot be used (Could not determine",
                                                       "pass the path of a pattern directory or file")),
    "name_too_long": ({}, "@/" + "p" * 5000, ("cannot be used (File name too long)", "pass the path of a pattern")),
    "nul_in_user_name": ({}, "~\0", ("cannot be used (embedded null byte)", "pass the path of a pattern")),
}


@pytest.mark.parametrize("case", LOADER_CRASHES)
def test_loader_crash_inputs_are_refused_naming_the_fix(case):
    files, path, expected = LOADER_CRASHES[case]
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            _write(Path(tmp), name, content)
        with pytest.raises(PatternError) as info:
            load_pattern(path.replace("@", tmp, 1))
    message = _assert_one_line(info.value)
    for part in expected:
        assert part in message, message


# ============================================================================ options parser

def _assert_valid_options(cfg: DuoConfig, raw: dict) -> None:
    assert isinstance(cfg, DuoConfig)
    assert sum(getattr(cfg, n) is not None for n in ("sparsity", "retrieval_ratio", "threshold")) <= 1
    for name in ("sparsity", "retrieval_ratio"):
        value = getattr(cfg, name)
        assert value is None or (type(value) in (int, float) and 0 <= value <= 1)
    assert cfg.threshold is None or (type(cfg.threshold) in (int, float) and math.isfinite(cfg.threshold))
    for name in ("sink", "recent"):
        assert type(getattr(cfg, name)) is int and getattr(cfg, name) > 0
    assert type(cfg.min_retrieval_per_layer) is int and cfg.min_retrieval_per_layer >= 0
    assert type(cfg.reorder_heads) is bool and type(cfg.overlap_streaming) is bool
    assert cfg.pattern is None or isinstance(cfg.pattern, str)
    assert cfg.effective_sparsity is None or 0.0 <= cfg.effective_sparsity <= 1.0
    for key, value in raw.items():
        assert getattr(cfg, key) == value, "options are taken verbatim"


def _parse_checked(additional_config) -> str:
    try:
        cfg = DuoConfig.from_additional_config(additional_config)
    except DuoConfigError as error:
        _assert_one_line(error)
        return "refused"
    duo = additional_config.get("duo", {}) if isinstance(additional_config, dict) else {}
    _assert_valid_options(cfg, json.loads(duo) if isinstance(duo, str) else duo)
    return "ok"


# Values close to valid ones (so that some whole dicts pass) and wrong ones of every JSON type.
option_values = st.one_of(
    st.sampled_from([0, 1, 0.25, 0.5, 1.0, 2, 64, 256, True, False, None, "patterns/x"]),
    field_values,
)
option_keys = st.one_of(st.sampled_from(OPTION_NAMES), st.sampled_from(OPTION_NAMES), st.text(max_size=10))
option_dicts = st.dictionaries(option_keys, option_values, max_size=5)


@FUZZ
@given(duo=option_dicts, as_json=st.booleans())
@example(duo={"pattern": "p", "sparsity": 0.5, "sink": 8}, as_json=False)
@example(duo={"sparsity": 10**400}, as_json=True)
@example(duo={"threshold": -(10**400)}, as_json=False)
def _option_dicts(outcomes, duo, as_json):
    outcomes[_parse_checked({"duo": json.dumps(duo) if as_json else duo})] += 1


@FUZZ
@given(duo=st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.none(), st.booleans(),
                                     st.tuples(st.integers()), st.sampled_from(OPTION_NAMES)),
                           option_values, max_size=4))
@example(duo={"sink": 4})
@example(duo={1: 0, "x": 0})
def _option_dicts_with_any_keys(outcomes, duo):
    """Python callers (``LLM(additional_config=...)``) may pass keys that are not strings."""
    outcomes[_parse_checked({"duo": duo})] += 1


@FUZZ
@given(text=st.one_of(st.text(max_size=60), json_values.map(json.dumps), option_dicts.map(json.dumps),
                      option_dicts.map(lambda d: json.dumps(d)[: len(json.dumps(d)) // 2])),
       outer=st.one_of(st.none(), st.just({}), st.dictionaries(st.text(max_size=5), json_values, max_size=2)))
@example(text='{"sparsity": 0.5}', outer=None)
@example(text="[" * 5000, outer=None)
@example(text='{"sink": ' + "1" * 5000 + "}", outer=None)
def _option_json_strings(outcomes, text, outer):
    outcomes[_parse_checked({**(outer or {}), "duo": text})] += 1


@FUZZ
@given(additional_config=st.one_of(
    json_values, st.dictionaries(st.one_of(st.just("duo"), st.text(max_size=5)), json_values, max_size=3)))
@example(additional_config={"duo": {"recent": 32}})
@example(additional_config={"duo": {"recent": 0}})
def _whole_additional_config(outcomes, additional_config):
    outcomes[_parse_checked(additional_config)] += 1


@pytest.mark.parametrize("target", [_option_dicts, _option_dicts_with_any_keys, _option_json_strings,
                                    _whole_additional_config], ids=lambda f: f.__name__.strip("_"))
def test_options_parser_fuzz(target):
    outcomes = Counter()
    target(outcomes)
    assert outcomes["ok"] and outcomes["refused"], f"the fuzz missed a path of the parser: {dict(outcomes)}"


# Inputs the fuzz crashed the parser with (OverflowError, TypeError, RecursionError, a plain
# ValueError) before duo_vllm.config turned them into one-line errors.
OPTION_CRASHES = {
    "sparsity_beyond_float": ({"sparsity": 10**400}, ('"sparsity" must be a number in [0, 1], got 1000',)),
    "threshold_beyond_float": ({"threshold": -(10**400)}, ('"threshold" must be a finite number, got -1000',)),
    "keys_of_mixed_types": ({None: 0, "": 0, 1: 0}, ("Unknown DUO option(s) ['', 1, None]",
                                                    "valid options: ['kernel', 'min_retrieval_per_layer'")),
    "json_nesting_too_deep": ("[" * 5000, ('"duo" options are not valid JSON', "example: --additional-config")),
    "json_integer_over_4300_digits": ('{"sink": ' + "1" * 5000 + "}",
                                      ('"duo" options are not valid JSON', "example: --additional-config")),
}


@pytest.mark.parametrize("case", OPTION_CRASHES)
def test_options_crash_inputs_are_refused_naming_the_fix(case):
    duo, expected = OPTION_CRASHES[case]
    with pytest.raises(DuoConfigError) as info:
        DuoConfig.from_additional_config({"duo": duo})
    message = _assert_one_line(info.value)
    for part in expected:
        assert part in message, message


def test_options_checker_sees_both_outcomes():
    assert _parse_checked({"duo": {"sparsity": 0.5, "sink": 8}}) == "ok"
    assert _parse_checked({"duo": '{"threshold": 0.2}'}) == "ok"
    assert _parse_checked({"duo": {"sparsity": 0.5, "threshold": 0.2}}) == "refused"
    assert _parse_checked({"duo": "{"}) == "refused"
