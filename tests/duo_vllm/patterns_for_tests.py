"""Patterns the tests build for the real test model (random gates: the math must hold for any)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duo_vllm.fingerprint import model_fingerprint
from duo_vllm.pattern import HeadPattern
from duo_vllm.pattern_io import save_pattern


def random_pattern_dir(folder: Path, *, num_layers: int, num_kv_heads: int, seed: int = 0,
                       hf_config=None, model_name: str | None = None) -> str:
    rng = np.random.default_rng(seed)
    pattern = HeadPattern(
        gates=rng.random((num_layers, num_kv_heads)).astype(np.float32),
        model_name=model_name,
        model_fingerprint=model_fingerprint(hf_config) if hf_config is not None else None,
        provenance={"kind": "random gates for tests", "seed": seed},
    )
    save_pattern(pattern, folder, overwrite=True)
    return str(folder)
