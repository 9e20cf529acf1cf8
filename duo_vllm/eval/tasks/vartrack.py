"""Variable tracking: a chain of assignments ``VAR B = VAR A`` spread through the text, plus a
distractor chain; name every variable that holds the value (RULER vt, one chain of four hops)."""

from __future__ import annotations

import random
import string

from duo_vllm.eval.prompts import PromptBuilder
from duo_vllm.eval.tasks import Sample

NAME = "vartrack"
USES_DEPTH = False
MAX_TOKENS = 48
HOPS = 4


def _names(rng: random.Random, count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in out:
            out.append(name)
    return out


def _chain(names: list[str], value: int) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def make(builder: PromptBuilder, length: int, depth: float | None, rng: random.Random, *, index: int = 0) -> Sample:
    names = _names(rng, 2 * (HOPS + 1))
    value, other = rng.sample(range(10_000, 100_000), 2)
    asked, distractor = names[:HOPS + 1], names[HOPS + 1:]
    needles = _chain(asked, value) + _chain(distractor, other)
    # each chain in text order: sorted depths per chain
    depths = sorted(rng.random() for _ in range(HOPS + 1)) + sorted(rng.random() for _ in range(HOPS + 1))
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {HOPS + 1} "
              f"variables are assigned the value {value}, they are:")
    prompt = builder.with_needles(length, needles, depths, question, prefix, rng)
    return Sample(NAME, length, None, index, prompt.ids, asked, MAX_TOKENS,
                  [prompt.needle_depth(k) for k in range(len(needles))], question)
