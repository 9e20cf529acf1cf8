"""Validated training configuration for DuoAttention gate training.

One dataclass holds every knob of a run so that the CLI, the Python API, checkpoints and the
pattern's provenance all describe a run the same way. Validation happens in ``__post_init__`` and
raises :class:`GateTrainingError` (a ``ValueError``) whose message says how to fix the input, so
that mistakes surface before a model is loaded, not hours into training.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["GateTrainingError", "TrainConfig", "DTYPES", "DEVICES_HELP", "STREAMING_CHOICES"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
STREAMING_CHOICES = ("auto", "sdpa", "flex")
DEVICES_HELP = "'auto', 'cpu', 'cuda' or 'cuda:N'"


class GateTrainingError(ValueError):
    """Bad input for gate training; the message names the problem and the fix."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    """Everything that defines a gate-training run.

    Defaults follow the DuoAttention paper's *training* setting (sink 128, recent 256, 2000 steps,
    400-step warm-up and decay, lr 0.02 from/to 0.002, reg 0.05, ten 32-word passkeys, 50 context
    lengths), except the context range, which defaults to 1000 tokens .. the model's maximum
    (capped at 32768). The pattern records the sink/recent it was trained with; the plugin serves
    its own ``sink``/``recent`` options (default 64/256, the paper's *deployment* setting) and its
    start-up line names the trained window when they differ (``duo_vllm.config``, docs/patterns.md).

    Parameters
    ----------
    model : str
        Hugging Face model folder (config.json + weights) of a decoder-only causal LM.
    out : str
        Output folder; receives ``duo_pattern.json``. Must not exist (or be empty) unless
        ``overwrite`` or ``resume``.
    work_dir : str, optional
        Checkpoints, data cache and training log; default ``<out>/work``.
    sink, recent : int
        Attention sinks and recent window of a streaming head during training.
    min_context, max_context : int
        Range of context lengths (tokens of haystack + passkeys, before the question).
        ``max_context=None`` means the model's ``max_position_embeddings`` minus room for the
        question and answer, capped at 32768.
    num_lengths : int
        Context lengths are spread over this many equal intervals of [min, max].
    num_passkeys, passkey_length : int
        Passkeys per sample, and words per passkey.
    haystack : str, optional
        Text the passkeys are hidden in: a UTF-8 text file or a folder of ``*.txt`` files
        (e.g. the kind of text the model will serve). Default: the Canterbury corpus.
    steps : int
        Optimiser steps (``batch_size`` samples each).
    warmup : int, optional
        Steps of linear warm-up from ``lr_min`` to ``lr`` and, at the end, of linear decay back
        to ``lr_min``; default ``round(0.2 * steps)`` (the paper's 400 of 2000).
    lr, lr_min : float
        Peak and start/end learning rates of AdamW.
    weight_decay : float
        AdamW weight decay (0: the L1 term is the only regulariser).
    reg_weight : float
        Weight of ``mean(|alpha|)`` in the loss.
    seed : int
        Seeds data generation and torch.
    dtype : str
        Model weights/activations dtype: 'auto' (the checkpoint's bf16/fp16 as bf16, else fp32),
        'float32', 'bfloat16' or 'float16'. Gates are always fp32.
    device : str
        'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'.
    streaming : str
        Streaming-attention kernel: 'auto' (flex on CUDA, sdpa on CPU), 'sdpa' or 'flex'.
    gradient_checkpointing : bool
        Recompute layer activations in the backward pass (long contexts on GPU).
    sparsity : float
        Default deployment sparsity written to the pattern (fraction of streaming heads).
    overwrite, resume : bool
        Replace an existing output folder / continue from its latest checkpoint.
    save_every : int
        Checkpoint every N steps (0: only at the end).
    log_every : int
        Log gate statistics every N steps.
    eval_samples : int
        Held-out samples evaluated at the end (lengths spread up to max_context).
    num_threads : int, optional
        torch CPU threads (default: torch's choice).
    batch_size : int, optional
        Samples per optimiser step; their gradients are averaged. Default: one per process (1 for
        a plain run, N under ``torchrun --nproc-per-node N``); under torchrun it must be a
        multiple of the number of processes, each of which trains ``batch_size / N`` of them.
    """

    model: str
    out: str
    work_dir: str | None = None
    sink: int = 128
    recent: int = 256
    min_context: int = 1000
    max_context: int | None = None
    num_lengths: int = 50
    num_passkeys: int = 10
    passkey_length: int = 32
    haystack: str | None = None
    steps: int = 2000
    warmup: int | None = None
    lr: float = 0.02
    lr_min: float = 0.002
    weight_decay: float = 0.0
    reg_weight: float = 0.05
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    streaming: str = "auto"
    gradient_checkpointing: bool = False
    sparsity: float = 0.5
    overwrite: bool = False
    resume: bool = False
    save_every: int = 100
    log_every: int = 10
    eval_samples: int = 4
    num_threads: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("model", "out"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value):
                raise GateTrainingError(f"{name} must be a non-empty path, got {value!r}")
            setattr(self, name, str(value))
        if self.work_dir is not None:
            self.work_dir = str(self.work_dir)
        if self.haystack is not None:
            if not isinstance(self.haystack, (str, Path)) or not str(self.haystack):
                raise GateTrainingError(f"haystack must be a non-empty path, got {self.haystack!r}")
            self.haystack = str(self.haystack)

        positive = ("sink", "recent", "min_context", "num_lengths", "num_passkeys",
                    "passkey_length", "steps", "log_every", "eval_samples")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise GateTrainingError(f"{name} must be a positive integer, got {value!r}")
        for name in ("save_every", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise GateTrainingError(f"{name} must be an integer >= 0, got {value!r}")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads <= 0):
            raise GateTrainingError(f"num_threads must be a positive integer, got {self.num_threads!r}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size <= 0):
            raise GateTrainingError(
                f"batch_size must be a positive integer (or None for one sample per process), "
                f"got {self.batch_size!r}"
            )

        if self.max_context is not None:
            if not _is_int(self.max_context) or self.max_context <= 0:
                raise GateTrainingError(
                    f"max_context must be a positive integer (or None for the model's maximum), "
                    f"got {self.max_context!r}"
                )
            if self.max_context < self.min_context:
                raise GateTrainingError(
                    f"max_context ({self.max_context}) is below min_context ({self.min_context}); "
                    "swap them or raise --max-context"
                )
        if self.min_context <= self.sink + self.recent:
            raise GateTrainingError(
                f"min_context ({self.min_context}) must exceed sink + recent "
                f"({self.sink} + {self.recent}): shorter contexts make streaming attention equal "
                "full attention, so the gates learn nothing; raise --min-context or lower "
                "--sink/--recent"
            )

        if self.warmup is None:
            self.warmup = int(round(0.2 * self.steps))
        if not _is_int(self.warmup) or self.warmup < 0 or 2 * self.warmup > self.steps:
            raise GateTrainingError(
                f"warmup must be an integer in [0, steps/2] = [0, {self.steps // 2}] (it is used for "
                f"both the warm-up and the final decay), got {self.warmup!r}"
            )
        for name in ("lr", "lr_min"):
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                raise GateTrainingError(f"{name} must be a positive number, got {value!r}")
        if self.lr_min > self.lr:
            raise GateTrainingError(
                f"lr_min ({self.lr_min}) is above lr ({self.lr}); lr is the peak of the schedule"
            )
        for name in ("weight_decay", "reg_weight"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise GateTrainingError(f"{name} must be a number >= 0, got {value!r}")
        if not _is_real(self.sparsity) or not 0.0 <= self.sparsity <= 1.0:
            raise GateTrainingError(
                f"sparsity must be in [0, 1] (the fraction of streaming heads), got {self.sparsity!r}"
            )

        if self.dtype not in DTYPES:
            raise GateTrainingError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.streaming not in STREAMING_CHOICES:
            raise GateTrainingError(
                f"streaming must be one of {', '.join(STREAMING_CHOICES)}; got {self.streaming!r}"
            )
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise GateTrainingError(f"device must be {DEVICES_HELP}; got {self.device!r}")
        if self.overwrite and self.resume:
            raise GateTrainingError(
                "overwrite and resume contradict each other: --overwrite starts over, --resume "
                "continues the run in the output folder; pass one"
            )

    # ------------------------------------------------------------------ derived paths

    @property
    def out_path(self) -> Path:
        return Path(self.out).expanduser()

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir).expanduser() if self.work_dir else self.out_path / "work"

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_path / "checkpoints"

    @property
    def data_cache_dir(self) -> Path:
        return self.work_path / "data"

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Fields that change the result of a run; a resumed run must agree on all of them.
    RUN_DEFINING = (
        "sink", "recent", "min_context", "max_context", "num_lengths", "num_passkeys",
        "passkey_length", "steps", "warmup", "lr", "lr_min", "weight_decay", "reg_weight",
        "seed", "dtype", "streaming", "batch_size",
    )

    def run_defining(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.RUN_DEFINING}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
