"""The package list in pyproject.toml covers the tree, and shipped patterns are found by model."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(ROOT)).replace("/", ".")
             for top in ("duo_vllm", "gate_training") for p in (ROOT / top).rglob("__init__.py")}
    assert found | {"duo_vllm_patterns"} == listed


def test_shipped_smollm2_pattern_is_found_by_fingerprint(smollm2):
    from duo_vllm.pattern import model_fingerprint
    from duo_vllm.shipped_patterns import find_shipped_pattern

    config = json.loads((Path(smollm2) / "config.json").read_text())
    pattern = find_shipped_pattern("/any/path/to/a/renamed/model", model_fingerprint(config))
    assert pattern is not None, "no shipped pattern matches SmolLM2's config fingerprint"
    assert (pattern.num_layers, pattern.num_kv_heads) == (30, 3)
    assert pattern.model_fingerprint == model_fingerprint(config)
