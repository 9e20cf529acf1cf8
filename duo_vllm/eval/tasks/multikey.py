"""Multi-key needle: the asked key's number among three distractor keys' numbers (RULER niah_multikey)."""

from __future__ import annotations

import random

from duo_vllm.eval.prompts import PromptBuilder
from duo_vllm.eval.tasks import Sample
from duo_vllm.eval.tasks._needles import keys, needle, random_depths, values

NAME = "multikey"
USES_DEPTH = False
MAX_TOKENS = 24
DISTRACTORS = 3


def make(builder: PromptBuilder, length: int, depth: float | None, rng: random.Random, *, index: int = 0) -> Sample:
    ks, vs = keys(builder, rng, 1 + DISTRACTORS), values(rng, 1 + DISTRACTORS)
    question = f"What is the special magic number for {ks[0]} mentioned in the provided text?"
    prefix = f"The special magic number for {ks[0]} mentioned in the provided text is"
    depths = random_depths(rng, len(ks))
    prompt = builder.with_needles(length, [needle(k, v) for k, v in zip(ks, vs)], depths, question, prefix, rng)
    return Sample(NAME, length, None, index, prompt.ids, [vs[0]], MAX_TOKENS,
                  [prompt.needle_depth(k) for k in range(len(ks))], question)
