"""Every bad DUO input stops start-up with one clear message, before an engine process starts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from duo_vllm.pattern import PatternError
from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.server import run_vllm_expect_failure


@pytest.fixture(scope="module")
def good_pattern(tmp_path_factory):
    return random_pattern_dir(tmp_path_factory.mktemp("good"), num_layers=30, num_kv_heads=3)


def _bad_patterns(root):
    wrong_shape = random_pattern_dir(root / "wrong_shape", num_layers=32, num_kv_heads=8)
    nan_dir = root / "nan"
    nan_dir.mkdir()
    gates = np.full((30, 3), 0.5).tolist()
    (nan_dir / "duo_pattern.json").write_text(
        json.dumps({"format": "duo-vllm-pattern", "version": 1, "num_layers": 30, "num_kv_heads": 3,
                    "gates": gates}).replace("0.5", "NaN", 1))
    other = SimpleNamespace(architectures=["LlamaForCausalLM"], num_hidden_layers=30, num_attention_heads=9,
                            num_key_value_heads=3, hidden_size=576, head_dim=64, vocab_size=32000,
                            rope_theta=10000.0, max_position_embeddings=2048)
    other_model = random_pattern_dir(root / "other_model", num_layers=30, num_kv_heads=3, hf_config=other,
                                     model_name="SomeOther-135M")
    return {"wrong_shape": wrong_shape, "nan": str(nan_dir), "other_model": other_model,
            "missing": str(root / "does-not-exist")}


CASES = {
    "wrong_shape": ({"pattern": "@wrong_shape"}, "32 layers x 8 KV heads"),
    "nan_gates": ({"pattern": "@nan"}, "non-finite value (nan)"),
    "other_model": ({"pattern": "@other_model"}, "fingerprint"),
    "missing_pattern": ({"pattern": "@missing"}, "does-not-exist"),
    "sparsity_above_1": ({"pattern": "@good", "sparsity": 1.5}, '"sparsity" must be a number in [0, 1]'),
    "sparsity_below_0": ({"pattern": "@good", "sparsity": -0.1}, '"sparsity" must be a number in [0, 1]'),
    "sink_zero": ({"pattern": "@good", "sink": 0}, '"sink" must be a positive integer'),
    "recent_negative": ({"pattern": "@good", "recent": -5}, '"recent" must be a positive integer'),
    "unknown_option": ({"pattern": "@good", "sprsity": 0.5}, "Unknown DUO option"),
    "no_pattern_for_model": ({}, "python -m gate_training"),
}


@pytest.mark.parametrize("case", CASES)
def test_offline_llm_refuses_bad_input(smollm2, tmp_path, good_pattern, case, monkeypatch):
    from vllm import LLM

    paths = {**_bad_patterns(tmp_path), "good": good_pattern}
    options, expected = CASES[case]
    options = {k: paths[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in options.items()}
    if case == "no_pattern_for_model":
        monkeypatch.setenv("DUO_VLLM_PATTERNS", str(tmp_path / "none"))
        monkeypatch.setattr("duo_vllm.shipped_patterns.pattern_dirs", lambda: [])
    with pytest.raises(PatternError) as info:
        LLM(model=smollm2, enforce_eager=True, max_model_len=1024, attention_backend="DUO",
            additional_config={"duo": options})
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message.strip(), "one message, one line"


@pytest.mark.slow
def test_serve_refuses_bad_sparsity(smollm2, good_pattern):
    duo = json.dumps({"duo": {"pattern": good_pattern, "sparsity": 2}})
    code, log = run_vllm_expect_failure(smollm2, "--attention-backend", "DUO", "--additional-config", duo,
                                        "--enforce-eager", "--max-model-len", "1024", timeout=120)
    assert code != 0
    assert '"sparsity" must be a number in [0, 1]' in log, log[-2000:]
    assert "Engine core initialization failed" not in log, "the error should come before any engine starts"


def test_weight_cache_needs_the_checkpoint_head_order(smollm2, good_pattern):
    """Weights post-processed by vLLM's preload daemon may or may not have had their heads
    reordered there: DUO asks for reorder_heads false on both sides instead of guessing."""
    from vllm import LLM

    with pytest.raises(PatternError, match='reorder_heads": false') as info:
        LLM(model=smollm2, enforce_eager=True, max_model_len=1024, attention_backend="DUO",
            load_format="ipc_cache", additional_config={"duo": {"pattern": good_pattern}})
    assert "\n" not in str(info.value).strip()


def test_pipeline_parallelism_is_refused_before_any_engine_starts(smollm2, good_pattern):
    """Not verified anywhere yet (vLLM's CPU build cannot run it even for stock attention): a
    clear refusal naming tensor parallelism rather than an untested KV layout per stage."""
    from vllm import LLM

    with pytest.raises(PatternError, match="--tensor-parallel-size") as info:
        LLM(model=smollm2, enforce_eager=True, max_model_len=1024, attention_backend="DUO",
            pipeline_parallel_size=2, distributed_executor_backend="mp",
            additional_config={"duo": {"pattern": good_pattern}})
    assert "pipeline parallelism" in str(info.value) and "\n" not in str(info.value).strip()
