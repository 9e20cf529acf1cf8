"""Multi-value: one key with four numbers at different depths; all four asked (RULER niah_multivalue)."""

from __future__ import annotations

import random

from duo_vllm.eval.prompts import PromptBuilder
from duo_vllm.eval.tasks import Sample
from duo_vllm.eval.tasks._needles import keys, needle, random_depths, values

NAME = "multivalue"
USES_DEPTH = False
MAX_TOKENS = 64
VALUES = 4


def make(builder: PromptBuilder, length: int, depth: float | None, rng: random.Random, *, index: int = 0) -> Sample:
    (key,), vs = keys(builder, rng, 1), values(rng, VALUES)
    question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    prefix = f"The special magic numbers for {key} mentioned in the provided text are"
    depths = random_depths(rng, VALUES)
    prompt = builder.with_needles(length, [needle(key, v) for v in vs], depths, question, prefix, rng)
    return Sample(NAME, length, None, index, prompt.ids, vs, MAX_TOKENS,
                  [prompt.needle_depth(k) for k in range(VALUES)], question)
