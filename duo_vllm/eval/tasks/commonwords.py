"""Common-words extraction: a numbered list of prose words in which ten words recur far more often
than any other; name the ten (RULER cwe). The list is the whole context: no haystack, no needle.

RULER repeats the ten words 30 times each and the others 3 times. Short contexts cannot hold
that, so the counts scale with the list: the ten take about half of it (at most 30 each), the rest
appear at most ``RARE`` times, and the ten always recur at least three times more often than those.
"""

from __future__ import annotations

import random

from duo_vllm.eval.prompts import PromptBuilder, PromptError
from duo_vllm.eval.tasks import Sample

NAME = "commonwords"
USES_DEPTH = False
MAX_TOKENS = 96
COMMON = 10
MAX_COMMON_REPEATS = 30
RARE = 3
QUESTION = f"What are the {COMMON} most common words in the above list?"
PREFIX = f"Answer: The top {COMMON} words that appear most often in the list are:"


def _word_list(words: list[str], common: list[str], entries: int, rng: random.Random) -> list[str]:
    """``entries`` words: each common word ``c`` times, other words at most ``RARE`` times (fewer
    where the list is short), shuffled."""
    c = max(4, min(MAX_COMMON_REPEATS, entries // (2 * COMMON)))
    rare = RARE if c >= RARE + 3 else 1
    out = [w for w in common for _ in range(c)]
    rest = [w for w in words if w not in common]
    rng.shuffle(rest)
    needed = max(0, entries - len(out))
    if needed > rare * len(rest):
        raise PromptError(f"the corpus has {len(rest)} distinct words, too few for a {entries}-word list")
    for k in range(needed):
        out.append(rest[k % max(1, (needed + rare - 1) // rare)])
    rng.shuffle(out)
    return out


def make(builder: PromptBuilder, length: int, depth: float | None, rng: random.Random, *, index: int = 0) -> Sample:
    budget = length - builder.frame_length(QUESTION, PREFIX)
    common = rng.sample(builder.words, COMMON)
    order = rng.random()  # the list is drawn afresh for each size tried, from the same seed

    def entries_ids(n: int) -> list[list[int]]:
        listed = _word_list(builder.words, common, n, random.Random(order))
        return builder.encode_many([f"{k + 1}. {w}\n" for k, w in enumerate(listed)])

    n = max(COMMON * 4, budget // 5)
    for _ in range(8):  # settle the count near the budget: each entry is a few tokens
        used = sum(map(len, entries_ids(n)))
        if used <= budget and budget - used < 64:
            break
        n = max(COMMON * 4, int(n * budget / max(used, 1)))
    best: list[list[int]] = []
    for _ in range(64):  # then step to the longest list that fits (within an entry of the budget)
        ids = entries_ids(n)
        if sum(map(len, ids)) > budget:
            if best:
                break
            n -= 1
            continue
        best = ids
        n += 1
    context = [t for entry in best for t in entry]
    if len(context) < COMMON * 4:
        raise PromptError(f"a {length}-token prompt is too short for a common-words list; use a longer length")
    prompt = builder.with_context(context, QUESTION, PREFIX)
    return Sample(NAME, length, None, index, prompt.ids, common, MAX_TOKENS, [], QUESTION)
