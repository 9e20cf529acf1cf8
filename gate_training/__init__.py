"""Learn DuoAttention gates (retrieval vs streaming KV heads) for a Hugging Face decoder.

``python -m gate_training --model PATH --out patterns/NAME`` trains one fp32 gate per (layer, KV
head) by distilling the frozen full-attention model into a mix of full and streaming
(sink + recent) attention, and writes a ``duo_pattern.json`` that the duo-vllm plugin loads.
See docs/gate_training.md. Importing this package is cheap: torch and transformers load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gate_training.config import GateTrainingError, TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from gate_training.trainer import GateTrainer, TrainResult

__all__ = ["GateTrainingError", "TrainConfig", "GateTrainer", "TrainResult", "train"]


def __getattr__(name):
    if name in ("GateTrainer", "TrainResult", "train"):
        from gate_training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'gate_training' has no attribute {name!r}")
