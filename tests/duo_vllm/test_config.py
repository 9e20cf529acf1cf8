"""Tests of duo_vllm.config: reading and validating ``--additional-config '{"duo": {...}}'``."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from duo_vllm.config import DEFAULT_RECENT, DEFAULT_SINK, DuoConfig, DuoConfigError

FIELDS = ["kernel", "min_retrieval_per_layer", "overlap_streaming", "pattern", "recent", "reorder_heads", "retrieval_ratio",
          "sink", "sparsity", "threshold"]


def read(duo):
    return DuoConfig.from_additional_config({"duo": duo})


# ----------------------------------------------------------------------------- valid input


@pytest.mark.parametrize("additional_config", [None, {}, {"other_plugin": {"x": 1}}, {"duo": {}}])
def test_defaults(additional_config):
    cfg = DuoConfig.from_additional_config(additional_config)
    assert cfg == DuoConfig()
    assert (cfg.pattern, cfg.sparsity, cfg.retrieval_ratio, cfg.threshold) == (None, None, None, None)
    assert (cfg.sink, cfg.recent, cfg.min_retrieval_per_layer) == (DEFAULT_SINK, DEFAULT_RECENT, 0)
    assert cfg.effective_sparsity is None


def test_field_names_are_the_documented_options():
    assert sorted(f.name for f in dataclasses.fields(DuoConfig)) == FIELDS


@pytest.mark.parametrize(
    "duo",
    [
        {"pattern": "patterns/SmolLM2-135M-Instruct", "sparsity": 0.5},
        {"sparsity": 0, "sink": 1, "recent": 1},
        {"sparsity": 1, "min_retrieval_per_layer": 2},
        {"sparsity": 0.75, "sink": 4, "recent": 16},
        {"retrieval_ratio": 0.25},
        {"retrieval_ratio": 1.0},
        {"threshold": 0.5},
        {"threshold": -3},
        {"threshold": 2.5, "min_retrieval_per_layer": 1},
        {"pattern": "/abs/path/duo_pattern.json"},
        {"reorder_heads": False},
        {"overlap_streaming": False},
    ],
)
def test_valid_dicts_are_taken_verbatim(duo):
    cfg = read(duo)
    for key, value in duo.items():
        assert getattr(cfg, key) == value, f"{key}: {getattr(cfg, key)!r} != {value!r}"
    untouched = {f.name: f.default for f in dataclasses.fields(DuoConfig)} | duo
    assert cfg == DuoConfig(**untouched)


def test_json_string_value():
    duo = {"pattern": "p", "sparsity": 0.3, "sink": 8, "recent": 32, "min_retrieval_per_layer": 1}
    assert read(json.dumps(duo)) == read(duo) == DuoConfig(**duo)


def test_config_is_frozen_and_hashable():
    cfg = read({"sparsity": 0.4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 0.9  # type: ignore[misc]
    assert hash(cfg) == hash(read({"sparsity": 0.4}))


@pytest.mark.parametrize(
    "duo,expected",
    [
        ({}, None),
        ({"sparsity": 0.3}, 0.3),
        ({"sparsity": 1}, 1.0),
        ({"retrieval_ratio": 0.25}, 0.75),
        ({"retrieval_ratio": 0}, 1.0),
        ({"retrieval_ratio": 1}, 0.0),
        ({"threshold": 0.5}, None),
    ],
)
def test_effective_sparsity(duo, expected):
    got = read(duo).effective_sparsity
    if expected is None:
        assert got is None
    else:
        assert isinstance(got, float) and math.isclose(got, expected), f"{duo}: {got!r} != {expected}"


# ----------------------------------------------------------------------------- errors


def test_unknown_key_lists_valid_options():
    with pytest.raises(DuoConfigError) as info:
        read({"sparsity": 0.5, "sinks": 4, "window": 9})
    message = str(info.value)
    assert "sinks" in message and "window" in message, message
    assert "valid options" in message, message
    for name in FIELDS:
        assert name in message, f"valid option {name!r} not listed in: {message}"


@pytest.mark.parametrize("name", ["sparsity", "retrieval_ratio"])
@pytest.mark.parametrize("value", [-0.1, 1.5, 1.0000001, "x", "0.5", True, False, float("nan"),
                                   float("inf"), [0.5]])
def test_bad_fractions(name, value):
    with pytest.raises(DuoConfigError, match=name):
        read({name: value})


@pytest.mark.parametrize("name", ["reorder_heads", "overlap_streaming"])
@pytest.mark.parametrize("value", [0, 1, "false", None, [True]])
def test_bad_switches(name, value):
    with pytest.raises(DuoConfigError, match=f"{name}.*true or false"):
        read({name: value})


@pytest.mark.parametrize("value", [True, "0.5", float("nan"), float("inf"), -float("inf"), [1]])
def test_bad_threshold(value):
    with pytest.raises(DuoConfigError, match="threshold"):
        read({"threshold": value})


@pytest.mark.parametrize(
    "duo",
    [
        {"sparsity": 0.5, "threshold": 0.3},
        {"sparsity": 0.5, "retrieval_ratio": 0.5},
        {"retrieval_ratio": 0.5, "threshold": 0.3},
        {"sparsity": 0.5, "retrieval_ratio": 0.5, "threshold": 0.3},
    ],
)
def test_exclusive_choices(duo):
    with pytest.raises(DuoConfigError, match="exclusive") as info:
        read(duo)
    for key in duo:
        assert key in str(info.value)


@pytest.mark.parametrize("name", ["sink", "recent"])
@pytest.mark.parametrize("value", [0, -1, 1.5, 4.0, True, "4", None])
def test_bad_token_counts(name, value):
    with pytest.raises(DuoConfigError, match=f'"{name}" must be a positive integer'):
        read({name: value})


@pytest.mark.parametrize("value", [-1, 1.5, True, "1", None])
def test_bad_min_retrieval_per_layer(value):
    with pytest.raises(DuoConfigError, match="min_retrieval_per_layer"):
        read({"min_retrieval_per_layer": value})


@pytest.mark.parametrize("value", [5, 0.5, ["patterns/x"], {"path": "x"}, b"patterns/x"])
def test_pattern_must_be_a_string(value):
    with pytest.raises(DuoConfigError, match="pattern"):
        read({"pattern": value})


@pytest.mark.parametrize("duo", [[1, 2], 5, 0.5, True, "[1, 2]", '"text"', "42"])
def test_duo_value_must_be_an_object(duo):
    with pytest.raises(DuoConfigError, match="JSON object"):
        read(duo)


@pytest.mark.parametrize("duo", ["{sparsity: 0.5}", "{'sparsity': 0.5}", "", "{"])
def test_duo_value_invalid_json(duo):
    with pytest.raises(DuoConfigError, match="not valid JSON"):
        read(duo)


def test_errors_are_value_errors():
    """DuoConfigError is a ValueError, so vLLM's argument handling reports it as bad input."""
    with pytest.raises(ValueError):
        read({"sink": 0})
