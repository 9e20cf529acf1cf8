"""The compared backends: inverse and random keep DUO's number of retrieval heads, differ in which."""

import numpy as np
import pytest

from duo_vllm.eval.backends import base_runtime, resolve
from duo_vllm.pattern_io import load_pattern


def test_inverse_random_streaming_at_duos_budget(smollm2, tmp_path):
    duo = {"sparsity": 0.5, "sink": 16, "recent": 64}
    backends = {b.name: b for b in resolve(["stock", "duo", "streaming", "inverse", "random"], smollm2, duo,
                                           tmp_path, seed=3)}
    assert backends["stock"].engine_kwargs() == {}
    assert backends["duo"].engine_kwargs()["additional_config"] == {"duo": duo}
    assert backends["streaming"].duo["sparsity"] == 1.0 and backends["streaming"].duo["sink"] == 16
    base = base_runtime(smollm2, duo).retrieval_mask
    for name in ("inverse", "random"):
        options = backends[name].duo
        assert options["sink"] == 16 and options["recent"] == 64
        mask = base_runtime(smollm2, options).retrieval_mask
        assert mask.sum() == base.sum() == backends[name].retrieval_heads
        assert load_pattern(options["pattern"]).model_fingerprint is not None
    inverse = base_runtime(smollm2, backends["inverse"].duo).retrieval_mask
    assert np.array_equal(inverse, ~base)  # at 50%: exactly the heads DUO streams
    random_mask = base_runtime(smollm2, backends["random"].duo).retrieval_mask
    assert not np.array_equal(random_mask, base)


def test_every_duo_variant_runs_on_the_same_kernels(smollm2, tmp_path):
    """All-streaming, inverse and random are compared with DUO on one vLLM backend (option kernel)."""
    duo = {"sparsity": 0.5, "kernel": "flashinfer", "overlap_streaming": True}
    for backend in resolve(["duo", "streaming", "inverse", "random"], smollm2, duo, tmp_path, seed=0):
        assert backend.duo["kernel"] == "flashinfer" and backend.duo["overlap_streaming"] is True, backend.name


def test_threshold_options_keep_the_head_count(smollm2, tmp_path):
    duo = {"threshold": 0.5, "min_retrieval_per_layer": 1}
    base = base_runtime(smollm2, duo).retrieval_mask
    (inverse,) = resolve(["inverse"], smollm2, duo, tmp_path, seed=0)
    assert base_runtime(smollm2, inverse.duo).retrieval_mask.sum() == base.sum()


def test_unknown_backend(smollm2, tmp_path):
    with pytest.raises(ValueError, match="unknown backend"):
        resolve(["duo", "h2o"], smollm2, {}, tmp_path, seed=0)
