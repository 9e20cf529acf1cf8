"""The gate-training loop: distil the full-attention model into its gated self.

Set-up checks, the loop, checkpoints and export. What a step computes (teacher and student
passes, the loss ``mean((student - teacher)^2) + reg_weight * mean(|alpha|)``, the held-out
evaluation) is :mod:`gate_training.distillation`. AdamW updates the gates only; they are clamped
to [0, 1] after each step (the reference clips at load time; clamping keeps the mix a convex
combination throughout). A step averages the gradients of ``batch_size`` samples (default 1;
under torchrun one per process, see :mod:`gate_training.distributed`).

Learning rate: linear warm-up from ``lr_min`` to ``lr`` over the first ``warmup`` steps,
constant, then linear decay back to ``lr_min`` over the last ``warmup`` steps (paper: 0.002 ->
0.02 -> 0.002 with 400 of 2000 steps).

Checkpoints (:mod:`gate_training.checkpoint`) are written every ``save_every`` steps into
``<work>/checkpoints``; ``resume`` continues from the latest one and gives the same gates as an
uninterrupted run (data is a pure function of the seed and step). The pattern's provenance record
is :func:`gate_training.export.training_provenance`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gate_training import checkpoint, distributed, preflight
from gate_training.config import GateTrainingError, TrainConfig
from gate_training.data import (
    PasskeySpec,
    build_passkey_dataset,
    describe_haystack,
    eval_samples,
    load_haystack,
)
from gate_training.distillation import Distillation, GatedModel
from gate_training.export import (
    export_pattern,
    gate_stats,
    training_provenance,
    unsettled_warning,
)
from gate_training.gated_attention import GateState, install_gates

logger = logging.getLogger(__name__)

__all__ = ["GateTrainer", "GatedModel", "TrainResult", "lr_at", "train"]


def lr_at(step: int, *, steps: int, warmup: int, lr: float, lr_min: float) -> float:
    """Learning rate of (0-based) ``step``: warm-up, plateau, decay; see the module docstring."""
    if warmup <= 0:
        return lr
    if step < warmup:
        return lr_min + (lr - lr_min) * step / warmup
    decay_start = steps - warmup
    if step >= decay_start:
        return lr - (lr - lr_min) * (step - decay_start + 1) / warmup
    return lr


@dataclass
class TrainResult:
    """What a call to :meth:`GateTrainer.train` produced."""

    gates: np.ndarray
    steps_done: int
    finished: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    pattern_path: Path | None = None
    wall_time_s: float = 0.0


class GateTrainer:
    """Set-up (all checks first), training loop, checkpoints and export for one run.

    Use ``GateTrainer(cfg).train()``; the constructor performs every pre-training check and
    raises :class:`GateTrainingError` on bad input before any step runs.
    """

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.cfg = cfg
        self.dist = distributed.from_env()
        self.progress = progress and self.dist.is_main
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.batch_size = distributed.resolve_batch_size(cfg, self.dist)
        self.per_rank = self.batch_size // self.dist.world_size
        self._owns_group = False
        if self.dist.enabled:  # the device decides the backend; checks that do not depend on the rank
            self.device = distributed.resolve_device(cfg, self.dist)
            self._owns_group = distributed.init_process_group(self.dist, self.device)

        # Set-up phases. In a multi-process run each ends with every rank agreeing on success (one
        # error raised everywhere), and rank 0 goes first wherever files are written.
        agree = functools.partial(distributed.agree, self.dist)
        main = self.dist.is_main
        # 1. cheap checks: paths, haystack text (fetched into the cache), the model's config.json
        agree(self._check_paths, run=main)
        # 2. tokenizer, held-out samples, the model routed through the gated attention
        agree(lambda: self._setup_model(check_paths=not main))
        if self.dist.enabled:  # 2b. shard the frozen model (and gates) with FSDP2, then probe
            agree(self._shard)
        # 3. the training table, written to disk only once everything above passed
        agree(self._build_data, run=main)
        checkpoint = agree(lambda: self._read_checkpoint(build_data=not main))

        self._param = self.gated.gates  # the trained parameter (an FSDP shard in a multi-process run)
        self.optimizer = torch.optim.AdamW(
            [self._param], lr=cfg.lr_min, weight_decay=cfg.weight_decay
        )
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0
        if checkpoint is not None:
            self._apply_checkpoint(*checkpoint)
        elif cfg.overwrite and main:
            self._clear_checkpoints()

    def _check_paths(self) -> None:
        cfg = self.cfg
        preflight.check_output_dir(cfg)
        self._checkpoint_path = self._find_checkpoint() if cfg.resume else None
        if cfg.resume and self._checkpoint_path is None:
            raise GateTrainingError(
                f"--resume given but {cfg.checkpoint_dir} holds no checkpoint; run without --resume "
                "(add --overwrite to replace the folder)"
            )
        load_haystack(cfg.haystack)

    def _setup_model(self, check_paths: bool) -> None:
        cfg = self.cfg
        if check_paths:
            self._check_paths()
        self.hf_config = preflight.read_model_config(cfg.model)
        self.max_context = preflight.resolve_context(cfg, self.hf_config)
        if not self.dist.enabled:
            self.device = preflight.resolve_device(cfg)
        self.dtype = preflight.resolve_dtype(cfg, self.hf_config)
        self.streaming_impl = cfg.streaming if cfg.streaming != "auto" else (
            "flex" if self.device.type == "cuda" else "sdpa"
        )
        self.model_name = Path(cfg.model).expanduser().resolve().name

        # tokenizer and the held-out sample (passkeys that do not fit, samples too long)
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError, KeyError) as exc:
            raise GateTrainingError(
                f"cannot load the tokenizer of {cfg.model} ({str(exc).splitlines()[0]}); the model "
                "folder needs its tokenizer files"
            ) from None
        self.spec = PasskeySpec(
            num_samples=cfg.steps * self.batch_size,
            min_context=cfg.min_context,
            max_context=self.max_context,
            num_lengths=cfg.num_lengths,
            num_passkeys=cfg.num_passkeys,
            passkey_length=cfg.passkey_length,
            seed=cfg.seed,
            haystack=cfg.haystack,
        )
        self.eval_samples = eval_samples(self.tokenizer, self.spec, cfg.eval_samples)
        self.eval_sample = self.eval_samples[-1]  # the longest
        self._check_length(max(len(s["input_ids"]) for s in self.eval_samples))

        # the model, routed through the gated attention. Several processes load it on the CPU:
        # FSDP moves it to the GPU shard by shard (no GPU ever holds the whole model).
        torch.manual_seed(cfg.seed)
        load_device = torch.device("cpu") if self.dist.enabled else self.device
        self.model = preflight.load_frozen_model(cfg, self.hf_config, load_device, self.dtype)
        try:
            self.state: GateState = install_gates(
                self.model, sink=cfg.sink, recent=cfg.recent, streaming_impl=self.streaming_impl
            )
        except ValueError as exc:
            raise GateTrainingError(f"unsupported architecture: {exc}") from None
        self.gated = GatedModel(self.model, self.state)
        self.objective = Distillation(self.gated, self.state, self.device, reg_weight=cfg.reg_weight)
        if not self.dist.enabled:
            preflight.probe_gated_routing(self.model, self.state, self.device)
        self.decoder = self.model.base_model

    def _shard(self) -> None:
        layers = distributed.shard_model(self.gated, self.model, self.device, self.dist)
        self.gated.sharded = True
        self.state.gates = self.gated.gates
        preflight.probe_gated_routing(
            self.model, self.state, self.device, forward=lambda ids: self.gated(ids, 0, 0)
        )
        self.gated.reshard()
        self._info("Sharded %s over %d processes (%s): %d decoder layers + root unit with the gates",
                   self.model_name, self.dist.world_size, self.device.type, layers)

    def _build_data(self) -> None:
        self.dataset = build_passkey_dataset(self.tokenizer, self.spec, self.cfg.data_cache_dir)
        self._check_length(_longest(self.dataset))

    def _read_checkpoint(self, build_data: bool) -> tuple[Path, dict[str, Any]] | None:
        if build_data:
            self._build_data()
        if self._checkpoint_path is None:
            return None
        return self._checkpoint_path, self._load_payload(self._checkpoint_path)

    def close(self) -> None:
        """Leave the process group if this trainer created it (multi-process runs; every rank)."""
        if self._owns_group:
            distributed.leave_process_group()
            self._owns_group = False

    def _info(self, *args) -> None:
        if self.dist.is_main:
            logger.info(*args)

    # ------------------------------------------------------------------ checks and identity

    def _check_length(self, length: int) -> None:
        max_pos = self.hf_config.max_position_embeddings
        if length > max_pos:
            raise GateTrainingError(
                f"samples reach {length} tokens (context + question + answer) but the model's "
                f"max_position_embeddings is {max_pos}; lower --max-context by {length - max_pos} "
                "or use fewer/shorter passkeys"
            )

    def resolved(self) -> dict[str, Any]:
        """The run-defining settings after 'auto' and defaults are resolved (stored in checkpoints)."""
        d = self.cfg.run_defining()
        d.update(max_context=self.max_context, dtype=str(self.dtype).replace("torch.", ""),
                 streaming=self.streaming_impl, batch_size=self.batch_size,
                 haystack=describe_haystack(self.cfg.haystack)["sha256"])
        return d

    # ------------------------------------------------------------------ losses (distillation.py)

    def teacher_hidden(self, sample: dict[str, Any]) -> torch.Tensor:
        """Final hidden states of the unmodified model at the supervised positions (fp32)."""
        return self.objective.teacher_hidden(sample)

    def losses(self, sample: dict[str, Any], *, grad: bool, teacher: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """Distillation and regularisation terms on one sample with the current gates."""
        return self.objective.losses(sample, grad=grad, teacher=teacher)

    def evaluate(self, samples: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Held-out distillation loss and answer-token accuracy of the trained, deployed (binarised
        at ``sparsity``), inverse and all-streaming gate sets, and the teacher's accuracy
        (:meth:`gate_training.distillation.Distillation.evaluate`); default: the held-out samples."""
        return self.objective.evaluate(samples or self.eval_samples, self._full_gates().clone(), self.cfg.sparsity)

    # ------------------------------------------------------------------ loop

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Train up to ``cfg.steps`` (or ``stop_after`` more steps), then checkpoint; export when done.

        ``stop_after`` splits a run over several invocations (continue with ``resume=True``).
        """
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg = self.cfg
        last = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        started = time.perf_counter()
        session_start = self.elapsed
        stack = contextlib.ExitStack()
        if self.progress:  # log lines go above the bar instead of through it
            stack.enter_context(logging_redirect_tqdm())
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress,
                   desc="gate training", unit="step", dynamic_ncols=True)
        if self.step == 0:
            self._info("Training %d x %d gates of %s on %s (%s, streaming=%s), %d steps%s",
                       *self._param.shape, self.model_name, self._where(),
                       str(self.dtype).replace("torch.", ""), self.streaming_impl, cfg.steps,
                       f" of {self.batch_size} samples" if self.batch_size > 1 else "")
        try:
            while self.step < last:
                record = self._train_step(self._step_samples(self.step))
                self.elapsed = session_start + time.perf_counter() - started
                record["elapsed_s"] = round(self.elapsed, 2)
                self.history.append(record)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", distill=f"{record['distill']:.4f}",
                                reg=f"{record['reg']:.3f}", alpha=f"{record['mean_alpha']:.3f}",
                                lr=f"{record['lr']:.4f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    stats = gate_stats(self._gates())
                    self._info(
                        "step %d/%d loss %.5f distill %.5f reg %.4f | gates mean %.3f min %.3f "
                        "max %.3f, %d/%d below 0.5 | %.2f s/step",
                        self.step, cfg.steps, record["loss"], record["distill"], record["reg"],
                        stats["mean"], stats["min"], stats["max"], stats["below_0.5"],
                        stats["num_heads"], self.elapsed / max(len(self.history), 1),
                    )
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            stack.close()
        self.save_checkpoint()
        finished = self.step >= cfg.steps
        result = TrainResult(gates=self._gates(), steps_done=self.step, finished=finished,
                             history=list(self.history), wall_time_s=self.elapsed)
        if finished:
            result.evaluation = self.evaluate()
            self._info("Held-out evaluation: %s", json.dumps(result.evaluation))
            if self.dist.is_main:
                result.pattern_path = self.export(result.evaluation, gates=result.gates)
                warning = unsettled_warning(gate_stats(result.gates, cfg.sparsity), reg_weight=cfg.reg_weight,
                                            hidden_mean_square=result.evaluation.get("teacher_hidden_mean_square"))
                if warning:
                    logger.warning(warning)
        if self.dist.enabled:  # every rank returns once the pattern is written, and knows its path
            import torch.distributed as dist

            shared = [result.pattern_path]
            dist.broadcast_object_list(shared, src=0)
            result.pattern_path = shared[0]
        return result

    def _step_samples(self, step: int) -> list[dict[str, Any]]:
        """This rank's share of step ``step``: samples ``step * batch_size + rank * per_rank + i``."""
        first = step * self.batch_size + self.dist.rank * self.per_rank
        return [self.dataset[first + i] for i in range(self.per_rank)]

    def _train_step(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        lr = lr_at(self.step, steps=cfg.steps, warmup=cfg.warmup, lr=cfg.lr, lr_min=cfg.lr_min)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        terms = []
        for i, sample in enumerate(samples):
            if self.dist.enabled:  # FSDP averages the accumulated gradient once, after the last
                self.gated.set_requires_gradient_sync(i == len(samples) - 1)
            sample_terms = self.losses(sample, grad=True)
            loss = sample_terms["loss"]
            (loss if len(samples) == 1 else loss / len(samples)).backward()
            terms.append({k: float(v.detach()) for k, v in sample_terms.items()}
                         | {"context_length": int(sample["context_length"])})
        self.optimizer.step()
        with torch.no_grad():
            self._param.clamp_(0.0, 1.0)
        if self.dist.enabled:  # the step's samples of all ranks, in sample order (for the record)
            import torch.distributed as dist

            gathered: list[list[dict[str, Any]]] = [[] for _ in range(self.dist.world_size)]
            dist.all_gather_object(gathered, terms)
            terms = [t for rank_terms in gathered for t in rank_terms]
        record = {
            "step": self.step + 1,
            "lr": lr,
            "loss": _batch_mean(t["loss"] for t in terms),
            "distill": _batch_mean(t["distill"] for t in terms),
            "reg": terms[0]["reg"],
            "mean_alpha": float(self._full_gates().mean()),
            "context_length": max(t["context_length"] for t in terms),
            "step_s": round(time.perf_counter() - t0, 3),
        }
        if len(terms) > 1:
            record["context_lengths"] = [t["context_length"] for t in terms]
        return record

    def _full_gates(self) -> torch.Tensor:
        """The whole gate tensor (detached; gathered from the ranks' shards in a multi-process run)."""
        return distributed.full_tensor(self._param.detach())

    def _gates(self) -> np.ndarray:
        return self._full_gates().float().cpu().numpy().copy()

    def _where(self) -> str:
        if not self.dist.enabled:
            return str(self.device)
        return f"{self.dist.world_size} processes ({self.device.type}, FSDP2)"

    # ------------------------------------------------------------------ checkpoints (checkpoint.py)

    def _find_checkpoint(self) -> Path | None:
        return checkpoint.latest(self.cfg.checkpoint_dir)

    def _clear_checkpoints(self) -> None:
        checkpoint.clear(self.cfg.checkpoint_dir)

    def save_checkpoint(self) -> Path:
        """Write ``step_NNNNNN.pt`` atomically; returns its path.

        In a multi-process run every rank must call it (the shards are gathered), rank 0 writes.
        """
        path = checkpoint.path_for(self.cfg.checkpoint_dir, self.step)
        gates = self._full_gates().cpu().clone()
        optimizer = checkpoint.gathered_optimizer_state(self.optimizer, self.dist)
        if not self.dist.is_main:
            return path
        checkpoint.write(path, {
            "step": self.step, "gates": gates, "optimizer": optimizer, "rng": checkpoint.rng_states(),
            "resolved": self.resolved(), "model_fingerprint": _fingerprint(self.hf_config),
            "history": self.history, "elapsed_s": self.elapsed,
        })
        self._info("Checkpoint %s", path)
        return path

    def _load_checkpoint(self, path: Path) -> None:
        self._apply_checkpoint(path, self._load_payload(path))

    def _load_payload(self, path: Path) -> dict[str, Any]:
        now = self.resolved()
        return checkpoint.read(path, resolved=now, fingerprint=_fingerprint(self.hf_config),
                               haystack_default=now["haystack"] if self.cfg.haystack is None else None,
                               world_size=self.dist.world_size)

    def _apply_checkpoint(self, path: Path, payload: dict[str, Any]) -> None:
        param = self._param
        with torch.no_grad():
            param.copy_(distributed.like_param(payload["gates"], param))
        optimizer = checkpoint.sharded_optimizer_state(payload["optimizer"], param, self.dist)
        if self.dist.enabled:
            self.gated.reshard()  # drop any gathered copy of the old gates
        self.optimizer.load_state_dict(optimizer)
        checkpoint.restore_rng_states(payload["rng"])
        self.step = int(payload["step"])
        self.history = list(payload["history"])
        self.elapsed = float(payload["elapsed_s"])
        self._info("Resumed from %s at step %d/%d", path, self.step, self.cfg.steps)

    # ------------------------------------------------------------------ export

    def export(self, evaluation: dict[str, Any] | None = None, gates: np.ndarray | None = None) -> Path:
        """Write the pattern (and the full training log into the work folder).

        ``gates``: the whole gate array (default: the current gates; in a multi-process run pass
        them, since gathering them is a collective and only rank 0 exports).
        """
        cfg = self.cfg
        gates = self._gates() if gates is None else gates
        provenance = training_provenance(self, evaluation, gates)
        cfg.work_path.mkdir(parents=True, exist_ok=True)
        (cfg.work_path / "history.json").write_text(json.dumps(self.history, indent=1))
        return export_pattern(
            cfg.out_path, gates, hf_config=self.hf_config, model_name=self.model_name,
            sink=cfg.sink, recent=cfg.recent, sparsity=cfg.sparsity, provenance=provenance,
            overwrite=True,
        )


def train(cfg: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Check everything, train, export: the Python equivalent of ``python -m gate_training``.

    Under torchrun every process calls it; the process group is left at the end.
    """
    trainer = GateTrainer(cfg, progress=progress)
    try:
        return trainer.train(stop_after=stop_after)
    finally:
        trainer.close()


# ---------------------------------------------------------------------- helpers


def _fingerprint(config) -> str:
    from duo_vllm.fingerprint import model_fingerprint

    return model_fingerprint(config)


def _longest(dataset) -> int:
    """Longest ``input_ids`` row, read from the Arrow table without materialising Python lists."""
    import pyarrow.compute as pc

    return int(pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py())


def _batch_mean(values) -> float:
    """Mean of a step's per-sample values (the value itself for batch 1)."""
    values = list(values)
    return values[0] if len(values) == 1 else float(np.mean(values))
