"""Checkpoints of a gate-training run: whole (unsharded) gates and optimizer state, the step, every
RNG, the loss history and elapsed time, written atomically as ``<work>/checkpoints/step_NNNNNN.pt``.

A checkpoint is only resumed by the run that wrote it: same resolved settings, same model. Holding
whole tensors, it can be resumed with another number of processes (same ``batch_size``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gate_training import distributed
from gate_training.config import GateTrainingError

FORMAT = 1
GLOB = "step_*.pt"


def latest(folder: Path) -> Path | None:
    found = sorted(folder.glob(GLOB))
    return found[-1] if found else None


def clear(folder: Path) -> None:
    for path in folder.glob(GLOB):
        path.unlink()


def path_for(folder: Path, step: int) -> Path:
    return folder / f"step_{step:06d}.pt"


def rng_states() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_states(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def write(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (with the format stamped) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    tmp.replace(path)
    return path


def read(path: Path, *, resolved: dict[str, Any], fingerprint: str, haystack_default: Any,
         world_size: int) -> dict[str, Any]:
    """Read ``path`` and check that it belongs to this run (settings, model)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt file must give one clear message
        raise GateTrainingError(f"cannot read checkpoint {path} ({exc}); delete it or use --overwrite") from None
    if payload.get("format") != FORMAT:
        raise GateTrainingError(f"{path} has checkpoint format {payload.get('format')!r}; use --overwrite")
    saved = dict(payload["resolved"])
    saved.setdefault("batch_size", 1)  # checkpoints from before batch_size existed
    if haystack_default is not None:  # ... or before --haystack (they used the Canterbury corpus)
        saved.setdefault("haystack", haystack_default)
    diff = {k: (saved.get(k), resolved.get(k)) for k in resolved if saved.get(k) != resolved.get(k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        hint = ""
        if "batch_size" in diff:
            hint = (f" (--batch-size defaults to the number of processes: pass --batch-size "
                    f"{diff['batch_size'][0]} to resume with {world_size})")
        raise GateTrainingError(
            f"cannot resume from {path}: the run was started with other settings ({detail}); "
            f"pass the same options{hint}, or --overwrite to start over"
        )
    if payload["model_fingerprint"] != fingerprint:
        raise GateTrainingError(f"{path} was trained on another model; use --overwrite or another --out")
    return payload


def gathered_optimizer_state(optimizer: torch.optim.Optimizer, dist) -> dict[str, Any]:
    """The optimizer's state dict with whole tensors (gathered from the shards if sharded)."""
    state = optimizer.state_dict()
    if not dist.enabled:
        return state
    return {
        "state": {
            key: {name: distributed.full_tensor(value).cpu() if torch.is_tensor(value) else value
                  for name, value in per_param.items()}
            for key, per_param in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def sharded_optimizer_state(state: dict[str, Any], param: torch.Tensor, dist) -> dict[str, Any]:
    """Whole tensors -> this rank's shards (every rank read the same file)."""
    if not dist.enabled:
        return state
    return {
        "state": {
            key: {name: distributed.like_param(value, param)
                  if torch.is_tensor(value) and value.shape == param.shape else value
                  for name, value in per_param.items()}
            for key, per_param in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }
