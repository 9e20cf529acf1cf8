"""The evaluation tasks: RULER-style synthetic long-context tasks over public-domain prose.

Each task is a module with ``NAME``, ``USES_DEPTH`` (whether the depth grid applies), ``MAX_TOKENS``
(the answer's budget) and ``make(builder, length, depth, rng) -> Sample``. A sample is a pure
function of its seed, so every backend is asked the same prompts.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from types import ModuleType

from duo_vllm.eval.prompts import PromptBuilder


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # prompt tokens asked for
    depth: float | None  # the grid depth, for tasks that have one
    index: int
    ids: list[int] = field(repr=False)
    answers: list[str]  # every one must appear in the output for a full score
    max_tokens: int
    needle_depths: list[float]  # where each needle landed, fraction of the context
    question: str
    variant: str = ""  # the inner task of a control sample

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


def sample_rng(seed: int, task: str, length: int, depth: float | None, index: int) -> random.Random:
    """A generator seeded by the cell and sample only (stable across runs and Python processes)."""
    key = f"{seed}:{task}:{length}:{'-' if depth is None else f'{depth:.6f}'}:{index}"
    return random.Random(zlib.crc32(key.encode()))


def _registry() -> dict[str, ModuleType]:
    from duo_vllm.eval.tasks import commonwords, control, multikey, multiquery, multivalue, needle, vartrack

    return {m.NAME: m for m in (needle, multikey, multivalue, multiquery, vartrack, commonwords, control)}


TASKS = ("needle", "multikey", "multivalue", "multiquery", "vartrack", "commonwords", "control")


def task_module(name: str) -> ModuleType:
    modules = _registry()
    if name not in modules:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return modules[name]


def make_sample(builder: PromptBuilder, task: str, length: int, depth: float | None, index: int,
                seed: int) -> Sample:
    module = task_module(task)
    rng = sample_rng(seed, task, length, depth, index)
    return module.make(builder, length, depth if module.USES_DEPTH else None, rng, index=index)
