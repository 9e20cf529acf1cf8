"""Short-context control: the other tasks' questions on a short context (the cell's length, 1-2K
tokens by default), one task per sample in turn. A backend that loses here loses on ordinary
requests, not only long ones."""

from __future__ import annotations

import dataclasses
import random

from duo_vllm.eval.prompts import PromptBuilder
from duo_vllm.eval.tasks import Sample

NAME = "control"
USES_DEPTH = False
MAX_TOKENS = 96
INNER = ("needle", "multikey", "multivalue", "multiquery", "vartrack", "commonwords")


def make(builder: PromptBuilder, length: int, depth: float | None, rng: random.Random, *, index: int = 0) -> Sample:
    from duo_vllm.eval.tasks import task_module

    inner = task_module(INNER[index % len(INNER)])
    sample = inner.make(builder, length, rng.random() if inner.USES_DEPTH else None, rng, index=index)
    return dataclasses.replace(sample, task=NAME, depth=None, variant=inner.NAME)
