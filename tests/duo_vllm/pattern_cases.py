"""What the pattern tests share: hypothesis strategies for gates, the reference binarisation rule,
the original-format writer and the published patterns (read from ../shared/anchors, never committed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duo_vllm.pattern_io import (
    ORIGINAL_CONFIG_FILENAME,
    ORIGINAL_GATES_FILENAME,
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

