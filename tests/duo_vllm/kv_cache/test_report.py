"""The KV report names the head map it is for: its file, format and digest."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import torch

from duo_vllm.config import DuoConfig
from duo_vllm.kv_cache.report import kv_report
from duo_vllm.pattern import HeadPattern
from duo_vllm.pattern_io import save_pattern
from duo_vllm.runtime import DuoRuntime, build_runtime

SMOLLM2_SHAPE = (30, 3)


def fake_vllm_config(block_size=16, max_model_len=1024):
    return SimpleNamespace(
        max_in_flight_tokens=2048,
        cache_config=SimpleNamespace(block_size=block_size, cache_dtype="auto"),
        model_config=SimpleNamespace(max_model_len=max_model_len, dtype=torch.bfloat16, get_head_size=lambda: 64),
        scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False),
    )


def write_masks(folder, mask):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "masks.tsv"
    path.write_text("\n".join("\t".join(str(int(v)) for v in row) for row in mask) + "\n")
    return path


def sha12(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def runtime_for(pattern_path, layers, kv_heads):
    return build_runtime(DuoConfig(pattern=str(pattern_path)), hf_config={"num_hidden_layers": layers},
                         model_name="m", num_layers=layers, total_kv_heads=kv_heads)


def test_report_names_a_masks_file(tmp_path):
    mask = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    path = write_masks(tmp_path, mask)
    report = kv_report(fake_vllm_config(), context_len=1024, runtime=runtime_for(path, 3, 2))
    assert (report.pattern_source, report.pattern_format, report.pattern_sha256) == (
        str(path), "prulong-masks-tsv", sha12(path))
    assert report.line().endswith(f"pattern prulong-masks-tsv sha256 {sha12(path)}"), report.line()
    assert report.retrieval_bytes_per_token == 4 * 2 * 64 * 2  # 4 retrieval heads, K+V, bf16


def test_report_names_our_format_and_a_pattern_without_a_file(tmp_path):
    path = save_pattern(HeadPattern(gates=np.random.default_rng(0).random((2, 2)), sparsity=0.5), tmp_path)
    report = kv_report(fake_vllm_config(), runtime=runtime_for(tmp_path, 2, 2))
    assert (report.pattern_format, report.pattern_sha256) == ("duo-vllm-json", sha12(path))
    bare = DuoRuntime(DuoConfig(), pattern=None, sparsity=None, retrieval_mask=np.array([[True, False]]))
    report = kv_report(fake_vllm_config(), runtime=bare)
    assert (report.pattern_format, report.pattern_sha256) == (None, None)
    assert report.line().endswith("pattern in memory"), report.line()


def test_report_command_json_names_the_map(smollm2, tmp_path, capsys):
    """``python -m duo_vllm.kv_cache.report --json`` carries the format and digest a later reader needs."""
    from duo_vllm.kv_cache.report import main

    mask = np.ones(SMOLLM2_SHAPE, dtype=bool)
    mask[::2, 1] = False
    path = write_masks(tmp_path / "prulong", mask)
    main([smollm2, "--max-model-len", "2048", "--duo", json.dumps({"pattern": str(path.parent)}), "--json"])
    out = capsys.readouterr().out  # vLLM's own log lines come first
    figures = json.loads(out[out.rindex("\n{\n") + 1:] if not out.startswith("{\n") else out)
    assert figures["pattern_format"] == "prulong-masks-tsv"
    assert figures["pattern_sha256"] == sha12(path)
    assert figures["pattern_source"] == str(path)
