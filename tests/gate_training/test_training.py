"""End-to-end gate training on SmolLM2 (CPU, short contexts): learning, export, determinism, resume.

One uninterrupted 8-step run on SmolLM2 (module fixture) is the reference for what training
learns and exports. Determinism and resume are properties of the trainer, not of the model: they
repeat an 8-step run of a tiny random Llama (``tiny_run``) and compare gates and losses bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from duo_vllm.fingerprint import model_fingerprint
from duo_vllm.pattern_io import load_pattern
from gate_training.config import GateTrainingError, TrainConfig
from gate_training.trainer import GateTrainer, lr_at

STEPS = 8


def _config(model: str, out, **overrides) -> TrainConfig:
    kwargs = dict(
        model=model, out=str(out), sink=16, recent=32, min_context=160, max_context=320,
        num_lengths=4, num_passkeys=2, passkey_length=8, steps=STEPS, warmup=2, seed=7,
        save_every=4, num_threads=2, dtype="bfloat16", eval_samples=2,
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


@pytest.fixture(scope="module")
def reference_run(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "pattern"
    trainer = GateTrainer(_config(smollm2, out), progress=False)
    teacher = trainer.teacher_hidden(trainer.eval_sample)
    before = {k: float(v) for k, v in trainer.losses(trainer.eval_sample, grad=False, teacher=teacher).items()}
    # gates all 1.0 rank every head equal: the deployment mask is then an arbitrary half
    before_eval = trainer.evaluate()
    result = trainer.train()
    after = {k: float(v) for k, v in trainer.losses(trainer.eval_sample, grad=False, teacher=teacher).items()}
    return {"trainer": trainer, "result": result, "before": before, "after": after,
            "before_eval": before_eval, "out": out}


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dirs, tmp_path_factory):
    """The uninterrupted reference of the determinism and resume tests, on a tiny random Llama."""
    out = tmp_path_factory.mktemp("tiny-run") / "pattern"
    model = tiny_model_dirs["llama"]
    result = GateTrainer(_config(model, out, max_context=200), progress=False).train()
    assert result.finished and result.steps_done == STEPS and (1.0 - result.gates).max() > 0.0
    return {"model": model, "result": result, "out": out}


def test_lr_schedule_warms_up_and_decays():
    kw = dict(steps=2000, warmup=400, lr=0.02, lr_min=0.002)
    assert lr_at(0, **kw) == pytest.approx(0.002)
    assert lr_at(200, **kw) == pytest.approx(0.011)
    assert lr_at(400, **kw) == lr_at(1599, **kw) == pytest.approx(0.02)
    assert lr_at(1999, **kw) == pytest.approx(0.002)
    assert lr_at(5, steps=10, warmup=0, lr=0.02, lr_min=0.002) == 0.02


def test_training_reduces_the_distillation_loss_and_moves_gates(reference_run):
    result, before, after = reference_run["result"], reference_run["before"], reference_run["after"]
    assert result.finished and result.steps_done == STEPS and len(result.history) == STEPS
    # at alpha = 1 the student is the teacher: zero distillation, objective = reg_weight
    assert before["distill"] == pytest.approx(0.0, abs=1e-6)
    assert before["loss"] == pytest.approx(0.05)
    assert after["reg"] < before["reg"]
    gates = result.gates
    assert gates.shape == (30, 3) and gates.min() >= 0.0 and gates.max() <= 1.0
    assert (1.0 - gates).max() > 0.05, "gates did not move away from 1.0"
    assert gates.mean() < 0.99
    # What training is for: the distillation loss of the model served with half of the heads
    # streaming (gates binarised at sparsity 0.5), on a held-out sample. Before training every
    # gate is 1.0 and the chosen half is arbitrary; after it the loss must be far lower, and far
    # lower than keeping the lowest-gate half or making every head streaming.
    ev, ev0 = result.evaluation["distill"], reference_run["before_eval"]["distill"]
    assert ev["deploy"] < 0.5 * ev0["deploy"], (ev0, ev)
    assert ev["deploy"] < 0.5 * ev["inverse"] and ev["deploy"] < 0.5 * ev["all_streaming"], ev
    acc = result.evaluation["answer_token_accuracy"]
    assert acc["deploy"] > acc["inverse"] and acc["deploy"] > acc["all_streaming"], acc
    assert result.evaluation["samples"] == 2 and result.evaluation["context_lengths"] == [160, 320]
    # the teacher's hidden-state scale, recorded for the reg-weight advice (SmolLM2: ~4, Qwen2.5: ~43)
    trainer = reference_run["trainer"]
    expected = np.mean([float(trainer.teacher_hidden(s).pow(2).mean()) for s in trainer.eval_samples])
    assert result.evaluation["teacher_hidden_mean_square"] == pytest.approx(expected, rel=1e-3)
    assert 1.0 < expected < 10.0


def test_exported_pattern_loads_for_the_model(reference_run, smollm2):
    from transformers import AutoConfig

    pattern = load_pattern(reference_run["out"])
    assert (pattern.num_layers, pattern.num_kv_heads) == (30, 3)
    assert pattern.model_fingerprint == model_fingerprint(AutoConfig.from_pretrained(smollm2))
    assert pattern.model_name == "SmolLM2-135M-Instruct"
    assert (pattern.sink_size, pattern.recent_size, pattern.sparsity) == (16, 32, 0.5)
    np.testing.assert_array_equal(pattern.gates, reference_run["result"].gates.astype(np.float32))
    prov = pattern.provenance
    assert prov["training"]["steps"] == STEPS and prov["training"]["seed"] == 7
    assert prov["data"]["num_passkeys"] == 2 and prov["data"]["max_context"] == 320
    assert set(prov["final_losses"]) >= {"last10_mean_loss", "last10_mean_distill"}
    assert prov["wall_time_s"] > 0 and prov["device"].startswith("cpu")
    assert pattern.binarize().sum() == 45  # default sparsity 0.5 of 90 heads


def test_same_seed_gives_same_gates(tiny_run, tmp_path):
    result = GateTrainer(_config(tiny_run["model"], tmp_path / "again", max_context=200), progress=False).train()
    np.testing.assert_array_equal(result.gates, tiny_run["result"].gates)
    assert [r["loss"] for r in result.history] == [r["loss"] for r in tiny_run["result"].history]


def test_resume_matches_uninterrupted_run(tiny_run, tmp_path):
    out, model = tmp_path / "resumed", tiny_run["model"]
    first = GateTrainer(_config(model, out, max_context=200), progress=False).train(stop_after=3)
    assert not first.finished and first.steps_done == 3 and not (out / "duo_pattern.json").exists()
    # the interrupted run saved at step 3: resuming continues from there (checkpoint every 4)
    resumed_trainer = GateTrainer(_config(model, out, max_context=200, resume=True), progress=False)
    assert resumed_trainer.step == 3
    resumed = resumed_trainer.train()
    assert resumed.finished and len(resumed.history) == STEPS
    np.testing.assert_array_equal(resumed.gates, tiny_run["result"].gates)
    ref_losses = [r["loss"] for r in tiny_run["result"].history]
    assert [r["loss"] for r in resumed.history] == ref_losses
    assert (out / "duo_pattern.json").is_file()


def test_resume_refuses_other_settings(tiny_run):
    with pytest.raises(GateTrainingError, match="lr: checkpoint 0.02 vs now 0.03"):
        GateTrainer(_config(tiny_run["model"], tiny_run["out"], max_context=200, resume=True, lr=0.03), progress=False)


def test_rerun_needs_overwrite(tiny_run):
    with pytest.raises(GateTrainingError, match="already exists; pass --overwrite"):
        GateTrainer(_config(tiny_run["model"], tiny_run["out"], max_context=200), progress=False)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen3", "qwen3moe", "llama31"])
def test_tiny_families_train_end_to_end(family, tiny_model_dirs, tmp_path):
    """No per-model code: the same trainer runs the other families (2 steps, random weights):
    Qwen2, Mistral, Qwen3 (q/k norms), Qwen3-MoE (sparse-MoE MLP) and Llama-3.1 (RoPE scaling)."""
    from transformers import AutoConfig

    cfg = _config(tiny_model_dirs[family], tmp_path / family, steps=2, warmup=0, dtype="float32",
                  max_context=200)
    result = GateTrainer(cfg, progress=False).train()
    assert result.finished and result.gates.shape == (2, 2)
    assert (1.0 - result.gates).max() > 0.0, "gates did not move"
    pattern = load_pattern(tmp_path / family)
    assert (pattern.num_layers, pattern.num_kv_heads) == (2, 2)
    assert pattern.model_fingerprint == model_fingerprint(AutoConfig.from_pretrained(tiny_model_dirs[family]))


def test_own_haystack_trains_and_is_recorded(tiny_model_dirs, tmp_path):
    """--haystack: samples come from the user's text, the pattern records where from, and a
    resume with another text is refused (the data would change under the run)."""
    import json

    from tests.gate_training.test_data import _own_text

    text = tmp_path / "own.txt"
    text.write_text(_own_text(words=4000))
    model = tiny_model_dirs["llama"]  # random weights: this is about the data, not the gates
    own = dict(steps=2, warmup=0, save_every=1, passkey_length=4, min_context=240, max_context=400, dtype="float32")
    cfg = _config(model, tmp_path / "own", haystack=str(text), **own)
    trainer = GateTrainer(cfg, progress=False)
    assert trainer.spec.haystack == str(text)
    result = trainer.train()
    assert result.finished
    provenance = json.loads((tmp_path / "own" / "duo_pattern.json").read_text())["provenance"]["data"]
    assert provenance["haystack"]["source"] == str(text.resolve())
    assert "user's haystack" in provenance["task"]
    other = tmp_path / "other.txt"
    other.write_text(_own_text(words=4000, seed=9))
    with pytest.raises(GateTrainingError, match="haystack: checkpoint"):
        GateTrainer(_config(model, tmp_path / "own", haystack=str(other), resume=True, **own), progress=False)
