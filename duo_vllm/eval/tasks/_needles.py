"""What the needle tasks share: keys, values and the wording of needles and questions (RULER's
"special magic number" needles, values of seven digits)."""

from __future__ import annotations

import random

from duo_vllm.eval.prompts import PromptBuilder


def keys(builder: PromptBuilder, rng: random.Random, count: int) -> list[str]:
    """``count`` distinct keys of two prose words, e.g. ``garden-rustle``."""
    out: list[str] = []
    while len(out) < count:
        key = f"{rng.choice(builder.words)}-{rng.choice(builder.words)}"
        if key not in out:
            out.append(key)
    return out


def values(rng: random.Random, count: int, taken: set[str] | None = None) -> list[str]:
    """``count`` distinct seven-digit numbers, none in ``taken``."""
    taken = set(taken or ())
    out: list[str] = []
    while len(out) < count:
        v = str(rng.randrange(1_000_000, 10_000_000))
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def random_depths(rng: random.Random, count: int) -> list[float]:
    return [rng.random() for _ in range(count)]
