"""Multi-process gate training (torchrun, FSDP2 over gloo on the CPU) on a tiny Llama.

One 2-process run, split in two launches: ``torchrun -m gate_training`` (the CLI) stops after 2 of
4 steps, then a worker (``dist_worker.py``, the Python API) resumes it to the end and reports each
rank's gates. The reference is one in-process run with ``batch_size=2``, which accumulates the
same two samples per step that the two ranks share: the gates must agree to float precision.
The error checks below run in-process (no processes started).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from duo_vllm.fingerprint import model_fingerprint
from duo_vllm.pattern_io import load_pattern
from gate_training import distributed
from gate_training.__main__ import main
from gate_training.config import GateTrainingError, TrainConfig
from gate_training.trainer import GateTrainer

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
STEPS = 4
SETTINGS = dict(
    sink=16, recent=32, min_context=160, max_context=256, num_lengths=4, num_passkeys=2,
    passkey_length=8, steps=STEPS, warmup=1, seed=7, save_every=2, num_threads=1,
    dtype="float32", eval_samples=1,
)


def _cli_args(model: str, out: Path, **overrides) -> list[str]:
    args = ["--model", model, "--out", str(out), "--no-progress"]
    for key, value in {**SETTINGS, **overrides}.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def _torchrun(target: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc TARGET...`` from the repository root."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *target]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory):
    model = tiny_model_dirs["llama"]
    root = tmp_path_factory.mktemp("distributed")
    out = root / "two-ranks"

    # launch 1: the CLI, 2 of 4 steps, then a checkpoint
    first = _torchrun(["-m", "gate_training", *_cli_args(model, out), "--stop-after", "2"])
    checkpoints = sorted(p.name for p in (out / "work" / "checkpoints").glob("step_*.pt"))
    pattern_after_first = (out / "duo_pattern.json").exists()

    # launch 2: the Python API resumes the run to the end; each rank reports its gates
    config = root / "resume.json"
    config.write_text(json.dumps({"model": model, "out": str(out), "resume": True, **SETTINGS}))
    _torchrun([str(WORKER), str(config)])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    # reference: one process accumulating the same 2 samples per step
    threads = torch.get_num_threads()
    try:
        reference = GateTrainer(TrainConfig(model=model, out=str(root / "one-process"), batch_size=2,
                                            **SETTINGS), progress=False).train()
    finally:
        torch.set_num_threads(threads)
    return {"first": first, "checkpoints": checkpoints, "pattern_after_first": pattern_after_first,
            "ranks": ranks, "out": out, "reference": reference, "model": model}


def test_cli_under_torchrun_stops_and_checkpoints(runs):
    stdout = runs["first"].stdout
    # rank 0 alone reports (and logs: the other rank stays below warnings)
    assert stdout.count("stopped at step 2/4; continue with --resume") == 1, stdout
    assert runs["first"].stderr.count("Training 2 x 2 gates") == 1
    assert "2 processes (cpu, FSDP2)" in runs["first"].stderr
    assert runs["checkpoints"] == ["step_000002.pt"]
    assert not runs["pattern_after_first"]


def test_ranks_are_sharded_and_end_with_identical_gates(runs):
    r0, r1 = runs["ranks"]
    for rank, report in enumerate(runs["ranks"]):
        assert report["rank"] == rank and report["world_size"] == 2 and report["batch_size"] == 2
        assert report["start_step"] == 2  # resumed from the first launch's checkpoint
        assert report["finished"] and report["steps_done"] == STEPS and len(report["losses"]) == STEPS
        assert report["gates_sharded"], "the gates are not an FSDP-sharded DTensor"
        assert report["layer_weight_local"] is not None
        assert report["layer_weight_local"] * 2 == report["layer_weight_full"]  # half each
    assert r0["gates"] == r1["gates"]
    assert r0["losses"] == r1["losses"] and r0["evaluation"] == r1["evaluation"]
    assert r0["pattern_path"] == r1["pattern_path"] == str(runs["out"] / "duo_pattern.json")


def test_training_moves_gates_and_exports_a_loadable_pattern(runs):
    from transformers import AutoConfig

    report = runs["ranks"][0]
    gates = np.asarray(report["gates"], dtype=np.float32)
    assert (1.0 - gates).max() > 0.01, "gates did not move away from 1.0"
    assert report["regs"][-1] < report["regs"][0]
    assert report["losses"][-1] < report["losses"][0]
    pattern = load_pattern(runs["out"])
    assert (pattern.num_layers, pattern.num_kv_heads) == (2, 2)
    assert pattern.model_fingerprint == model_fingerprint(AutoConfig.from_pretrained(runs["model"]))
    np.testing.assert_array_equal(pattern.gates, gates)
    training = pattern.provenance["training"]
    assert training["batch_size"] == 2 and training["steps"] == STEPS
    assert training["distributed"]["processes"] == 2 and training["distributed"]["backend"] == "gloo"
    assert pattern.provenance["data"]["samples"] == 2 * STEPS
    assert pattern.provenance["device"].endswith("x 2 processes")
    history = json.loads((runs["out"] / "work" / "history.json").read_text())
    assert [len(r["context_lengths"]) for r in history] == [2] * STEPS


def test_two_processes_equal_one_process_accumulating_two_samples(runs):
    reference = runs["reference"]
    report = runs["ranks"][0]
    np.testing.assert_allclose(np.asarray(report["gates"]), reference.gates, rtol=0, atol=1e-6)
    np.testing.assert_allclose(report["losses"], [r["loss"] for r in reference.history], rtol=1e-6)
    # both split each step's samples the same way: ranks 0 and 1 took samples 2s and 2s + 1
    history = json.loads((runs["out"] / "work" / "history.json").read_text())
    assert [r["context_lengths"] for r in history] == [r["context_lengths"] for r in reference.history]


# ---------------------------------------------------------------------- errors, in-process


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model="m", out="o", min_context=160, sink=16, recent=32, **kw)


def test_launch_is_read_from_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.from_env().enabled  # plain `python -m gate_training`
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.from_env().enabled  # torchrun --nproc-per-node 1: the single-process path
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = distributed.from_env()
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (3, 4, 1, False)
    monkeypatch.delenv("RANK")
    with pytest.raises(GateTrainingError, match="RANK is None; launch with `torchrun"):
        distributed.from_env()


def test_batch_size_must_split_over_the_processes():
    env = distributed.DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2)
    assert distributed.resolve_batch_size(_cfg(), env) == 2  # default: one sample per process
    assert distributed.resolve_batch_size(_cfg(batch_size=4), env) == 4
    assert distributed.resolve_batch_size(_cfg(batch_size=3), distributed.DistEnv()) == 3
    with pytest.raises(GateTrainingError, match="--batch-size 3 does not split over 2 processes.*"
                                                "use --batch-size 2 or 4"):
        distributed.resolve_batch_size(_cfg(batch_size=3), env)
    with pytest.raises(GateTrainingError, match="batch_size must be a positive integer"):
        _cfg(batch_size=0)


def test_device_choice_under_torchrun(monkeypatch):
    env = distributed.DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert distributed.resolve_device(_cfg(device="cpu"), env) == torch.device("cpu")
    with pytest.raises(GateTrainingError, match="--device cuda:0 names one GPU.*pass --device cuda"):
        distributed.resolve_device(_cfg(device="cuda:0"), env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device(_cfg(device="auto"), env) == torch.device("cpu")
    with pytest.raises(GateTrainingError, match="CUDA is not available; use --device cpu"):
        distributed.resolve_device(_cfg(device="cuda"), env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(GateTrainingError, match="started 2 processes on this node but only 1 GPU.*"
                                                "--nproc-per-node 1"):
        distributed.resolve_device(_cfg(device="cuda"), env)


@pytest.mark.parametrize("rank", [0, 1])
def test_cli_error_under_torchrun_is_reported_once(rank, monkeypatch, capsys, tmp_path):
    """A bad launch fails on every rank before the process group forms; rank 0 alone prints it."""
    import datasets
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    try:
        code = main(["--model", "m", "--out", str(tmp_path / "o"), "--batch-size", "3", "--device", "cpu",
                     "--no-progress"])
    finally:  # rank > 0 silences the libraries' progress bars; give them back to the other tests
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    if rank == 0:
        assert err[-1].startswith("error: --batch-size 3 does not split over 2 processes")
    else:
        assert not any(line.startswith("error:") for line in err)
