"""Multi-query: four keys, one number each, all asked at once (RULER niah_multiquery)."""

from __future__ import annotations

import random

from duo_vllm.eval.prompts import PromptBuilder
from duo_vllm.eval.tasks import Sample
from duo_vllm.eval.tasks._needles import keys, needle, random_depths, values

NAME = "multiquery"
USES_DEPTH = False
MAX_TOKENS = 64
QUERIES = 4


def make(builder: PromptBuilder, length: int, depth: float | None, rng: random.Random, *, index: int = 0) -> Sample:
    ks, vs = keys(builder, rng, QUERIES), values(rng, QUERIES)
    listed = ", ".join(ks[:-1]) + f" and {ks[-1]}"
    question = f"What are all the special magic numbers for {listed} mentioned in the provided text?"
    prefix = f"The special magic numbers for {listed} mentioned in the provided text are"
    depths = random_depths(rng, QUERIES)
    prompt = builder.with_needles(length, [needle(k, v) for k, v in zip(ks, vs)], depths, question, prefix, rng)
    return Sample(NAME, length, None, index, prompt.ids, vs, MAX_TOKENS,
                  [prompt.needle_depth(k) for k in range(QUERIES)], question)
