"""Data-parallel gate training over several processes: ``torchrun --nproc-per-node N -m gate_training``.

Each process (rank) holds the frozen model sharded with FSDP2 (``torch.distributed.fsdp.
fully_shard``: one FSDP unit per decoder layer, plus the root unit holding the embeddings, the
final norm and the gates), so the frozen weights take ``1/N`` of the memory per device and are
all-gathered layer by layer during the forward and backward passes. The gates are sharded like
any other parameter of the root unit; FSDP all-gathers them for the forward and reduce-scatters
(averages) their gradient across the ranks, so every rank steps the same optimizer on its shard
and all ranks hold identical gates. There is no communication code of our own in the training
step.

A step trains on ``batch_size`` samples (default: one per rank): sample ``step * batch_size + j``
goes to rank ``j // (batch_size / N)``, and each rank accumulates its share before the averaged
gradient is applied. A single process with ``--batch-size B`` computes the same step (up to the
float summation order), so runs can be resumed with another number of processes.

Start-up is made failure-safe: the set-up phases run on every rank and end in an agreement
(``all_gather_object`` of the error, if any), so a bad input raises the same
:class:`GateTrainingError` on every rank instead of leaving the others waiting in a collective;
files are written by rank 0 only (data cache first, then the others read it).

The launch is detected from the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); ``WORLD_SIZE`` absent or 1 means the ordinary single-process run. Backend: NCCL
on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from gate_training.config import GateTrainingError, TrainConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "DistEnv",
    "from_env",
    "resolve_device",
    "resolve_batch_size",
    "init_process_group",
    "leave_process_group",
    "agree",
    "decoder_layers",
    "shard_model",
    "full_tensor",
    "like_param",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a torchrun launch (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise GateTrainingError(
            f"environment variable {name}={value!r} is not an integer; launch several processes "
            "with `torchrun --nproc-per-node N -m gate_training ...`"
        ) from None


def from_env() -> DistEnv:
    """The launch described by torchrun's variables; a plain ``python -m`` run gives world size 1."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size is None or world_size <= 1:
        return DistEnv()
    rank = _env_int("RANK", None)
    if rank is None or not 0 <= rank < world_size:
        raise GateTrainingError(
            f"WORLD_SIZE={world_size} is set but RANK is {os.environ.get('RANK')!r}; launch "
            "with `torchrun --nproc-per-node N -m gate_training ...` (or unset WORLD_SIZE for one "
            "process)"
        )
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank,
                   local_world_size=local_world_size)


def resolve_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for 'auto' with CUDA or 'cuda', else the CPU.

    Every check here depends only on the launch, not on the rank, so all ranks fail alike.
    """
    if cfg.device.startswith("cuda:"):
        raise GateTrainingError(
            f"--device {cfg.device} names one GPU, but under torchrun each process uses the GPU of "
            "its LOCAL_RANK; pass --device cuda (or auto) and pick the GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GateTrainingError(
            f"--device {cfg.device} asked for but CUDA is not available; use --device cpu (gloo "
            "backend) or run on a machine with GPUs"
        )
    count = torch.cuda.device_count()
    if env.local_world_size > count or env.local_rank >= count:
        raise GateTrainingError(
            f"torchrun started {env.local_world_size} processes on this node but only {count} "
            f"GPU(s) are visible; use --nproc-per-node {count} (one process per GPU) or "
            "--device cpu"
        )
    return torch.device("cuda", env.local_rank)


def resolve_batch_size(cfg: TrainConfig, env: DistEnv) -> int:
    """Samples per optimizer step: ``cfg.batch_size`` or one per process; must split evenly."""
    batch = cfg.batch_size if cfg.batch_size is not None else env.world_size
    if batch % env.world_size:
        lower = max(env.world_size, batch // env.world_size * env.world_size)
        raise GateTrainingError(
            f"--batch-size {batch} does not split over {env.world_size} processes (each rank "
            f"trains batch_size / processes samples per step); use --batch-size {lower} or "
            f"{lower + env.world_size}, or a --nproc-per-node that divides {batch}"
        )
    return batch


def init_process_group(env: DistEnv, device: torch.device) -> bool:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); False if one already exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != env.world_size:
            raise GateTrainingError(
                f"a process group of {dist.get_world_size()} ranks already exists but "
                f"WORLD_SIZE={env.world_size}; launch with torchrun and let the trainer create it"
            )
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    logger.debug("rank %d/%d joined the %s process group", env.rank, env.world_size, dist.get_backend())
    return True


def leave_process_group() -> None:
    """Destroy the process group after a barrier; call it on every rank, on the normal path only.

    Without the barrier a rank sometimes aborted at exit after a finished run ("terminate called
    without an active exception": 2 of 12 two-process CPU runs; none of 25 with it). Likely cause
    (pytorch/pytorch#179291): a gloo worker thread still holding the last collective's tensors
    while the interpreter shuts down; the barrier makes every rank's last work tensor-free.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def agree(env: DistEnv, fn: Callable[[], T], *, run: bool = True) -> T | None:
    """Run ``fn`` (if ``run``) and, in a multi-process run, make every rank share its outcome.

    A :class:`GateTrainingError` raised on any rank is re-raised on every rank (the lowest rank's
    message), so no rank is left waiting in a collective while another has given up. Other
    exceptions are bugs: they propagate on their rank and torchrun stops the others.
    """
    if not env.enabled:
        return fn() if run else None
    import torch.distributed as dist

    result, error = None, None
    if run:
        try:
            result = fn()
        except GateTrainingError as exc:
            error = str(exc)
    errors: list[str | None] = [None] * env.world_size
    dist.all_gather_object(errors, error)
    for message in errors:
        if message is not None:
            raise GateTrainingError(message)
    return result


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks (transformers' ``_no_split_modules`` classes), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def shard_model(wrapper: torch.nn.Module, model: torch.nn.Module, device: torch.device,
                env: DistEnv) -> int:
    """``fully_shard`` every decoder layer, then ``wrapper`` (root: embeddings, norm, head, gates).

    Parameters are moved to ``device`` shard by shard, so a model loaded on the CPU never has to
    fit whole on one GPU. Returns the number of decoder layers sharded as their own unit.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (env.world_size,))
    layers = decoder_layers(model)
    if not layers:
        logger.warning(
            "%s declares no _no_split_modules: sharding the whole model as one FSDP unit (every "
            "rank all-gathers all weights at once)", type(model).__name__,
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(wrapper, mesh=mesh)
    return len(layers)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks for an FSDP-sharded DTensor (a collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor shaped like ``param``) placed and sharded as ``param`` is.

    Every rank passes the same ``value`` (read from the same checkpoint): no communication.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = value.to(device=param.device, dtype=param.dtype)
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value.to(device=param.device)


def describe(env: DistEnv) -> dict[str, Any]:
    """Provenance record of a multi-process run."""
    import torch.distributed as dist

    return {
        "processes": env.world_size,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "sharding": "FSDP2 fully_shard (decoder layers + root with gates)",
    }
