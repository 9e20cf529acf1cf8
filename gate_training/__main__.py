"""Command line: ``python -m gate_training --model PATH --out patterns/NAME [options]`` trains;
``python -m gate_training score MODEL --out DIR`` scores heads without training (gate_training.score).

Every option maps one-to-one onto a :class:`~gate_training.config.TrainConfig` field; defaults
come from the dataclass so the CLI and the Python API cannot drift apart. Bad input exits with
status 2 and one ``error:`` line before any training step.

Several processes (data parallel, FSDP2): ``torchrun --nproc-per-node N -m gate_training ...``.
Rank 0 alone prints, logs below warnings, shows the progress bar and writes files; every rank
exits with the same status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, fields

from gate_training.config import DEVICES_HELP, DTYPES, STREAMING_CHOICES, GateTrainingError, TrainConfig

_HELP = {
    "model": "local Hugging Face model folder (decoder-only causal LM: Llama, Qwen2, Mistral, ...)",
    "out": "output folder for duo_pattern.json (e.g. patterns/MODEL_NAME)",
    "work_dir": "checkpoints, data cache and training log (default: OUT/work)",
    "sink": "attention-sink tokens of a streaming head",
    "recent": "recent-window tokens of a streaming head",
    "min_context": "shortest context (haystack + passkeys) in tokens",
    "max_context": "longest context in tokens (default: the model's maximum, capped at 32768)",
    "num_lengths": "number of context-length intervals between min and max",
    "num_passkeys": "passkeys hidden per sample",
    "passkey_length": "words per passkey",
    "haystack": "text the passkeys are hidden in: a UTF-8 text file or a folder of .txt files "
                "(default: the Canterbury corpus)",
    "steps": "optimiser steps (batch 1); the paper uses 2000",
    "warmup": "warm-up and final-decay steps (default: 20%% of --steps)",
    "lr": "peak learning rate",
    "lr_min": "learning rate at the start of warm-up and the end of decay",
    "weight_decay": "AdamW weight decay",
    "reg_weight": "weight of mean(|alpha|) in the loss",
    "seed": "seed of data and torch",
    "dtype": "model dtype (gates are always fp32); auto = bf16 for bf16/fp16 checkpoints",
    "device": f"{DEVICES_HELP}",
    "streaming": "streaming-attention kernel: auto = flex on CUDA, sdpa on CPU",
    "gradient_checkpointing": "recompute activations in backward (long contexts)",
    "sparsity": "default deployment sparsity stored in the pattern (fraction of streaming heads)",
    "overwrite": "replace an existing output folder",
    "resume": "continue from the latest checkpoint in the work folder",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "log_every": "log gate statistics every N steps",
    "eval_samples": "held-out samples evaluated at the end",
    "num_threads": "torch CPU threads",
    "batch_size": "samples per optimiser step, gradients averaged (default: one per process; "
                  "under torchrun a multiple of --nproc-per-node)",
}
_CHOICES = {"dtype": DTYPES, "streaming": STREAMING_CHOICES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gate_training",
        description="Train DuoAttention gates for a Hugging Face decoder and write a duo-vllm pattern.",
        epilog="Without training, in minutes: python -m gate_training score MODEL --out DIR "
               "(see python -m gate_training score --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is MISSING and f.default_factory is MISSING
        kwargs = {"help": _HELP.get(f.name, f.name), "dest": f.name}
        if f.type in ("bool", bool):
            kwargs.update(action="store_true", default=f.default)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            kwargs.update(type=kind, required=required, choices=_CHOICES.get(f.name))
            if not required:
                kwargs["default"] = f.default
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--stop-after", type=int, default=None, dest="stop_after",
                        help="train at most N steps in this invocation, checkpoint and exit "
                             "(continue later with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        from gate_training.score import main as score_main

        return score_main(argv[1:])
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    stop_after = args.pop("stop_after")
    progress = not args.pop("no_progress")
    level = args.pop("log_level").upper()
    main_rank = _rank() == 0
    if not main_rank:  # other ranks only speak up about problems
        numeric = logging.getLevelName(level)
        if not isinstance(numeric, int) or numeric < logging.WARNING:
            level = "WARNING"
        _quiet_progress_bars()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    trainer = None
    try:
        from gate_training.trainer import GateTrainer

        cfg = TrainConfig(**args)
        trainer = GateTrainer(cfg, progress=progress)
        result = trainer.train(stop_after=stop_after)
    except GateTrainingError as exc:
        # multi-process: the trainer raises the same error on every rank; rank 0 reports it
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        _leave_process_group(trainer)
        return 2
    # (any other exception propagates without a goodbye: torchrun then stops the other ranks)
    _leave_process_group(trainer)
    if not main_rank:
        return 0
    if result.finished:
        print(f"wrote {result.pattern_path}")
    else:
        print(f"stopped at step {result.steps_done}/{cfg.steps}; continue with --resume")
    return 0


def _rank() -> int:
    """torchrun's RANK (0 for a plain run or a malformed value: the trainer reports that)."""
    import os

    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _quiet_progress_bars() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def _leave_process_group(trainer) -> None:
    if trainer is not None:
        trainer.close()
    if "torch.distributed" in sys.modules:  # a failed set-up may have joined the group already
        from gate_training.distributed import leave_process_group

        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
