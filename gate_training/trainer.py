"""The gate-training loop: distil the full-attention model into its gated self.

Per step (batch 1): the frozen model runs once as the teacher (plain causal attention, no
grad) and once as the student (every head mixes full and streaming attention by its gate); the
loss is the mean squared difference of the final hidden states (after the final norm) at the
positions that predict the answer tokens, plus ``reg_weight * mean(|alpha|)``, which pushes gates
towards streaming wherever the model does not need the full context. AdamW updates the gates
only; they are clamped to [0, 1] after each step (the reference clips at load time; clamping
keeps the mix a convex combination throughout).

Learning rate: linear warm-up from ``lr_min`` to ``lr`` over the first ``warmup`` steps,
constant, then linear decay back to ``lr_min`` over the last ``warmup`` steps (paper: 0.002 ->
0.02 -> 0.002 with 400 of 2000 steps).

Checkpoints (gates, optimizer, step, RNG states, loss history, elapsed time) are written every
``save_every`` steps into ``<work>/checkpoints``; ``resume`` continues from the latest one and
gives the same gates as an uninterrupted run (data is a pure function of the seed and step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gate_training.config import GateTrainingError, TrainConfig
from gate_training.data import PasskeySpec, build_passkey_dataset, eval_samples, load_haystack
from gate_training.export import export_pattern, gate_stats
from gate_training.gated_attention import GateState, install_gates
from gate_training import preflight

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_CKPT_GLOB = "step_*.pt"

__all__ = ["lr_at", "GateTrainer", "TrainResult", "train"]


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
        self.progress = progress
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)

        # 1. cheap checks: paths, haystack text, the model's config.json
        preflight.check_output_dir(cfg)
        checkpoint = self._find_checkpoint() if cfg.resume else None
        if cfg.resume and checkpoint is None:
            raise GateTrainingError(
                f"--resume given but {cfg.checkpoint_dir} holds no checkpoint; run without --resume "
                "(add --overwrite to replace the folder)"
            )
        load_haystack()
        self.hf_config = preflight.read_model_config(cfg.model)
        self.max_context = preflight.resolve_context(cfg, self.hf_config)
        self.device = preflight.resolve_device(cfg)
        self.dtype = preflight.resolve_dtype(cfg, self.hf_config)
        self.streaming_impl = cfg.streaming if cfg.streaming != "auto" else (
            "flex" if self.device.type == "cuda" else "sdpa"
        )
        self.model_name = Path(cfg.model).expanduser().resolve().name

        # 2. tokenizer and the held-out sample (passkeys that do not fit, samples too long)
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError, KeyError) as exc:
            raise GateTrainingError(
                f"cannot load the tokenizer of {cfg.model} ({str(exc).splitlines()[0]}); the model "
                "folder needs its tokenizer files"
            ) from None
        self.spec = PasskeySpec(
            num_samples=cfg.steps,
            min_context=cfg.min_context,
            max_context=self.max_context,
            num_lengths=cfg.num_lengths,
            num_passkeys=cfg.num_passkeys,
            passkey_length=cfg.passkey_length,
            seed=cfg.seed,
        )
        self.eval_samples = eval_samples(self.tokenizer, self.spec, cfg.eval_samples)
        self.eval_sample = self.eval_samples[-1]  # the longest
        self._check_length(max(len(s["input_ids"]) for s in self.eval_samples))

        # 3. the model, routed through the gated attention
        torch.manual_seed(cfg.seed)
        self.model = preflight.load_frozen_model(cfg, self.hf_config, self.device, self.dtype)
        try:
            self.state: GateState = install_gates(
                self.model, sink=cfg.sink, recent=cfg.recent, streaming_impl=self.streaming_impl
            )
        except ValueError as exc:
            raise GateTrainingError(f"unsupported architecture: {exc}") from None
        preflight.probe_gated_routing(self.model, self.state, self.device)
        self.decoder = self.model.base_model

        # 4. the training table, written to disk only once everything above passed
        self.dataset = build_passkey_dataset(self.tokenizer, self.spec, cfg.data_cache_dir)
        self._check_length(_longest(self.dataset))

        self.optimizer = torch.optim.AdamW(
            [self.state.gates], lr=cfg.lr_min, weight_decay=cfg.weight_decay
        )
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        elif cfg.overwrite:
            self._clear_checkpoints()

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
                 streaming=self.streaming_impl)
        return d

    # ------------------------------------------------------------------ losses

    def _hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state

    def _inputs(self, sample: dict[str, Any]) -> tuple[torch.Tensor, slice]:
        ids = torch.as_tensor(sample["input_ids"], dtype=torch.long, device=self.device).view(1, -1)
        # hidden state at position p predicts token p + 1: supervise the answer's predictors
        return ids, slice(int(sample["answer_start"]) - 1, ids.shape[1] - 1)

    def teacher_hidden(self, sample: dict[str, Any]) -> torch.Tensor:
        """Final hidden states of the unmodified model at the supervised positions (fp32)."""
        ids, sup = self._inputs(sample)
        with torch.no_grad(), self.state.teacher():
            return self._hidden(ids)[0, sup].float()

    def losses(self, sample: dict[str, Any], *, grad: bool, teacher: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """Distillation and regularisation terms on one sample with the current gates."""
        if teacher is None:
            teacher = self.teacher_hidden(sample)
        ids, sup = self._inputs(sample)
        with torch.set_grad_enabled(grad):
            student = self._hidden(ids)[0, sup].float()
            distill = (student - teacher).pow(2).mean()
            reg = self.state.gates.abs().mean()
            total = distill + self.cfg.reg_weight * reg
        return {"loss": total, "distill": distill, "reg": reg}

    def evaluate(self, samples: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Distillation loss and answer-token accuracy on held-out samples for several gate sets.

        ``trained``: the continuous gates; ``deploy``: binarised at ``sparsity`` (what the plugin
        serves: alpha 1 = full attention, 0 = streaming); ``inverse``: the same number of
        retrieval heads picked from the LOWEST gates; ``all_streaming``: every head streaming.
        Accuracy is teacher-forced: the share of answer (passkey) tokens that the model's argmax
        predicts; ``teacher`` is the unmodified model. A useful pattern has deploy << inverse
        in loss and deploy close to teacher in accuracy.
        """
        from duo_vllm.pattern import binarize

        samples = samples or self.eval_samples
        gates = self.state.gates.detach().clone()
        g = gates.cpu().numpy()
        deploy = binarize(g, sparsity=self.cfg.sparsity)
        inverse = binarize(-g, sparsity=self.cfg.sparsity)  # highest of -g = lowest gates
        candidates = {
            "trained": gates,
            "deploy": torch.from_numpy(deploy.astype(np.float32)),
            "inverse": torch.from_numpy(inverse.astype(np.float32)),
            "all_streaming": torch.zeros_like(gates),
        }
        head = self.model.get_output_embeddings()
        distill = {name: [] for name in candidates}
        accuracy = {name: [] for name in ["teacher", *candidates]}

        def token_accuracy(hidden, sample):
            with torch.no_grad():
                predicted = head(hidden.to(head.weight.dtype)).argmax(-1)
            target = torch.as_tensor(sample["input_ids"][int(sample["answer_start"]):], device=predicted.device)
            return float((predicted == target).float().mean())

        try:
            for sample in samples:
                teacher = self.teacher_hidden(sample)
                accuracy["teacher"].append(token_accuracy(teacher, sample))
                ids, sup = self._inputs(sample)
                for name, candidate in candidates.items():
                    with torch.no_grad():
                        self.state.gates.copy_(candidate.to(self.state.gates.device))
                        student = self._hidden(ids)[0, sup].float()
                    distill[name].append(float((student - teacher).pow(2).mean()))
                    accuracy[name].append(token_accuracy(student, sample))
        finally:
            with torch.no_grad():
                self.state.gates.copy_(gates)
        return {
            "samples": len(samples),
            "context_lengths": [int(s["context_length"]) for s in samples],
            "sparsity": self.cfg.sparsity,
            "distill": {k: round(float(np.mean(v)), 6) for k, v in distill.items()},
            "answer_token_accuracy": {k: round(float(np.mean(v)), 4) for k, v in accuracy.items()},
        }

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
            logger.info("Training %d x %d gates of %s on %s (%s, streaming=%s), %d steps",
                        *self.state.gates.shape, self.model_name, self.device,
                        str(self.dtype).replace("torch.", ""), self.streaming_impl, cfg.steps)
        try:
            while self.step < last:
                record = self._train_step(self.dataset[self.step])
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
                    logger.info(
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
            logger.info("Held-out evaluation: %s", json.dumps(result.evaluation))
            result.pattern_path = self.export(result.evaluation)
        return result

    def _train_step(self, sample: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        lr = lr_at(self.step, steps=cfg.steps, warmup=cfg.warmup, lr=cfg.lr, lr_min=cfg.lr_min)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        terms = self.losses(sample, grad=True)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        with torch.no_grad():
            self.state.gates.clamp_(0.0, 1.0)
        return {
            "step": self.step + 1,
            "lr": lr,
            "loss": float(terms["loss"].detach()),
            "distill": float(terms["distill"].detach()),
            "reg": float(terms["reg"].detach()),
            "mean_alpha": float(self.state.gates.detach().mean()),
            "context_length": int(sample["context_length"]),
            "step_s": round(time.perf_counter() - t0, 3),
        }

    def _gates(self) -> np.ndarray:
        return self.state.gates.detach().float().cpu().numpy().copy()

    # ------------------------------------------------------------------ checkpoints

    def _find_checkpoint(self) -> Path | None:
        found = sorted(self.cfg.checkpoint_dir.glob(_CKPT_GLOB))
        return found[-1] if found else None

    def _clear_checkpoints(self) -> None:
        for path in self.cfg.checkpoint_dir.glob(_CKPT_GLOB):
            path.unlink()

    def save_checkpoint(self) -> Path:
        """Write ``step_NNNNNN.pt`` atomically; returns its path."""
        folder = self.cfg.checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.step:06d}.pt"
        payload = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "gates": self.state.gates.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "resolved": self.resolved(),
            "model_fingerprint": _fingerprint(self.hf_config),
            "history": self.history,
            "elapsed_s": self.elapsed,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        logger.info("Checkpoint %s", path)
        return path

    def _load_checkpoint(self, path: Path) -> None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a corrupt file must give one clear message
            raise GateTrainingError(f"cannot read checkpoint {path} ({exc}); delete it or use --overwrite") from None
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise GateTrainingError(f"{path} has checkpoint format {payload.get('format')!r}; use --overwrite")
        saved, now = payload["resolved"], self.resolved()
        diff = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k)}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise GateTrainingError(
                f"cannot resume from {path}: the run was started with other settings ({detail}); "
                "pass the same options, or --overwrite to start over"
            )
        if payload["model_fingerprint"] != _fingerprint(self.hf_config):
            raise GateTrainingError(f"{path} was trained on another model; use --overwrite or another --out")
        with torch.no_grad():
            self.state.gates.copy_(payload["gates"].to(self.state.gates.device))
        self.optimizer.load_state_dict(payload["optimizer"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.step = int(payload["step"])
        self.history = list(payload["history"])
        self.elapsed = float(payload["elapsed_s"])
        logger.info("Resumed from %s at step %d/%d", path, self.step, self.cfg.steps)

    # ------------------------------------------------------------------ export

    def export(self, evaluation: dict[str, Any] | None = None) -> Path:
        """Write the pattern (and the full training log into the work folder)."""
        cfg = self.cfg
        tail = self.history[-10:]
        provenance = {
            "trainer": "gate_training (duo-vllm)",
            "model_path": str(Path(cfg.model).expanduser().resolve()),
            "model": preflight.describe_model(self.hf_config),
            "data": {
                "task": "multi-passkey retrieval in Canterbury-corpus prose",
                "num_passkeys": cfg.num_passkeys,
                "passkey_length_words": cfg.passkey_length,
                "min_context": cfg.min_context,
                "max_context": self.max_context,
                "num_lengths": cfg.num_lengths,
                "samples": cfg.steps,
            },
            "training": {
                "steps": self.step,
                "warmup": cfg.warmup,
                "lr": cfg.lr,
                "lr_min": cfg.lr_min,
                "weight_decay": cfg.weight_decay,
                "reg_weight": cfg.reg_weight,
                "seed": cfg.seed,
                "dtype": str(self.dtype).replace("torch.", ""),
                "gates_dtype": "float32",
                "streaming_impl": self.streaming_impl,
                "batch_size": 1,
            },
            "final_losses": {
                "last10_mean_loss": _mean(r["loss"] for r in tail),
                "last10_mean_distill": _mean(r["distill"] for r in tail),
                "last10_mean_reg": _mean(r["reg"] for r in tail),
            },
            "heldout_eval": evaluation,
            "gate_stats": gate_stats(self._gates(), cfg.sparsity),
            "wall_time_s": round(self.elapsed, 1),
            "seconds_per_step": round(self.elapsed / max(self.step, 1), 3),
            "device": _device_name(self.device),
            "versions": _versions(),
        }
        cfg.work_path.mkdir(parents=True, exist_ok=True)
        (cfg.work_path / "history.json").write_text(json.dumps(self.history, indent=1))
        return export_pattern(
            cfg.out_path, self._gates(), hf_config=self.hf_config, model_name=self.model_name,
            sink=cfg.sink, recent=cfg.recent, sparsity=cfg.sparsity, provenance=provenance,
            overwrite=True,
        )


def train(cfg: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Check everything, train, export: the Python equivalent of ``python -m gate_training``."""
    return GateTrainer(cfg, progress=progress).train(stop_after=stop_after)


# ---------------------------------------------------------------------- helpers


def _fingerprint(config) -> str:
    from duo_vllm.pattern import model_fingerprint

    return model_fingerprint(config)


def _longest(dataset) -> int:
    """Longest ``input_ids`` row, read from the Arrow table without materialising Python lists."""
    import pyarrow.compute as pc

    return int(pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py())


def _mean(values) -> float | None:
    values = list(values)
    return round(float(np.mean(values)), 6) if values else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import datasets

        out["datasets"] = datasets.__version__
    except ImportError:
        pass
    return out
