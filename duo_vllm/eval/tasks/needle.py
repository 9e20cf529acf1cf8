"""Single needle: one key's number hidden at the grid depth; the paper's needle-in-a-haystack."""

from __future__ import annotations

import random

from duo_vllm.eval.prompts import PromptBuilder
from duo_vllm.eval.tasks import Sample
from duo_vllm.eval.tasks._needles import keys, needle, values

NAME = "needle"
USES_DEPTH = True
MAX_TOKENS = 24


def make(builder: PromptBuilder, length: int, depth: float | None, rng: random.Random, *, index: int = 0) -> Sample:
    (key,), (value,) = keys(builder, rng, 1), values(rng, 1)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    prefix = f"The special magic number for {key} mentioned in the provided text is"
    depth = 0.5 if depth is None else depth
    prompt = builder.with_needles(length, [needle(key, value)], [depth], question, prefix, rng)
    return Sample(NAME, length, depth, index, prompt.ids, [value], MAX_TOKENS, [prompt.needle_depth(0)], question)
