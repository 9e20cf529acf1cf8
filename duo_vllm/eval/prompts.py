"""Prompts of an exact token length: the model's chat frame around a context of natural text with
needles placed at given depths.

Everything is assembled as token ids (the frame, the haystack slice and each needle encoded on
their own), so a prompt is exactly as long as asked and the needle sits where the task says; the
engines are sent these ids, never text to re-tokenise. The haystack is public-domain prose
(``duo_vllm.testing.haystack``), read from a seeded offset and wrapped round for contexts longer
than the corpus.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from duo_vllm.testing.haystack import encoded_text, sentence_end_ids, special_prefix, word_pool

_CONTEXT_SLOT = "\x00DUO_EVAL_CONTEXT\x00"
_SNAP_WINDOW = 96  # tokens searched after a depth for a sentence end to insert a needle at
_WRAP = "\n\n"  # between the corpus' end and its start, where a long context wraps round


class PromptError(ValueError):
    """A prompt that cannot be built as asked (too short for its needles, ...)."""


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    context_start: int  # index in ids of the first context token
    context_end: int
    needle_starts: list[int]  # index in ids of each needle's first token, in the order given
    needle_depths: list[float]  # share of the prose before each needle (the depth it landed at)

    def needle_depth(self, k: int) -> float:
        return self.needle_depths[k]


class PromptBuilder:
    """One tokenizer's prompts. ``chat``: wrap in the tokenizer's chat template (when it has one)."""

    def __init__(self, tokenizer, *, chat: bool = True):
        self.tokenizer = tokenizer
        self.chat = bool(chat and getattr(tokenizer, "chat_template", None))
        self._corpus = encoded_text(tokenizer)
        self._ends = sentence_end_ids(tokenizer, self._corpus)
        self._wrap = self.encode(_WRAP)
        self.words = word_pool()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def frame(self, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the context: the chat template's opening (with BOS where the
        model has one), then the question, the assistant turn and the start of the answer."""
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{_CONTEXT_SLOT}\n\n{question}"}],
                tokenize=False, add_generation_prompt=True)
            before, sep, after = text.partition(_CONTEXT_SLOT)
            if not sep:
                raise PromptError("the chat template dropped the user's message; pass --no-chat-template")
            head = self.encode(before)
            if not before:  # a template without BOS text: the tokenizer's own prefix
                head = special_prefix(self.tokenizer)
            return head, self.encode(after + answer_prefix)
        return special_prefix(self.tokenizer), self.encode(f"\n\n{question}\n\n{answer_prefix}")

    def haystack(self, n: int, rng: random.Random) -> list[int]:
        """``n`` tokens of prose from a seeded offset, wrapping round the corpus when needed."""
        corpus = self._corpus
        if n <= len(corpus):
            start = rng.randrange(0, len(corpus) - n + 1)
            return list(corpus[start:start + n])
        out: list[int] = []
        start = rng.randrange(0, len(corpus))
        while len(out) < n:
            out += list(corpus[start:]) + self._wrap
            start = 0
        return out[:n]

    def with_needles(self, length: int, needles: Sequence[str], depths: Sequence[float],
                     question: str, answer_prefix: str, rng: random.Random) -> Prompt:
        """A ``length``-token prompt: prose with each needle sentence inserted after the first
        sentence end at or after its depth (within a few dozen tokens), then the question."""
        if len(needles) != len(depths) or any(not 0.0 <= d <= 1.0 for d in depths):
            raise PromptError(f"needles and depths in [0, 1] must pair up, got {len(needles)} and {list(depths)}")
        head, tail = self.frame(question, answer_prefix)
        encoded = [self.encode(" " + n.strip()) for n in needles]
        hay_len = length - len(head) - len(tail) - sum(map(len, encoded))
        if hay_len < 1:
            raise PromptError(
                f"a {length}-token prompt cannot hold this task's frame and needles "
                f"({length - hay_len} tokens); use a longer length")
        hay = self.haystack(hay_len, rng)
        cuts = [self._snap(hay, int(round(d * hay_len))) for d in depths]
        order = sorted(range(len(needles)), key=lambda k: (cuts[k], depths[k], k))
        ids, starts, previous = list(head), [0] * len(needles), 0
        for k in order:
            ids += hay[previous:cuts[k]]
            starts[k] = len(ids)
            ids += encoded[k]
            previous = cuts[k]
        ids += hay[previous:]
        context_end = len(ids)
        ids += tail
        assert len(ids) == length, (len(ids), length)
        return Prompt(ids, len(head), context_end, starts, [c / hay_len for c in cuts])

    def with_context(self, context_ids: Sequence[int], question: str, answer_prefix: str) -> Prompt:
        head, tail = self.frame(question, answer_prefix)
        ids = [*head, *context_ids, *tail]
        return Prompt(ids, len(head), len(head) + len(context_ids), [], [])

    def frame_length(self, question: str, answer_prefix: str) -> int:
        head, tail = self.frame(question, answer_prefix)
        return len(head) + len(tail)

    def _snap(self, hay: Sequence[int], pos: int) -> int:
        for cand in range(pos, min(pos + _SNAP_WINDOW, len(hay)) + 1):
            if cand == 0 or cand == len(hay) or hay[cand - 1] in self._ends:
                return cand
        return pos
