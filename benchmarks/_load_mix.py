"""The request mix of ``serve_load.py`` and the client side of each request: seeded request specs
(``Workload``, the kinds in ``KINDS`` as the script's docstring lists them), one request's run
through an ``openai.AsyncOpenAI`` client and its outcome, and the ``Tally`` of outcomes. A library
of that script, imported by plain name from the benchmarks folder (like ``_common``)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

KINDS = {  # kind -> weight in the mix
    "long": 3, "short": 4, "chat": 3, "stream": 2, "n2": 1, "seeded": 2, "multiturn": 2,
    "disconnect": 1, "abort": 1, "probe": 2,
}
PROBES = 4  # fixed greedy prompts, half short, half long
MAX_TOKENS = 24


@dataclass
class Tally:
    sent: int = 0
    outcomes: dict = field(default_factory=lambda: {k: 0 for k in ("completed", "aborted", "4xx", "5xx", "lost")})
    by_kind: dict = field(default_factory=dict)
    probe_mismatches: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # first few 5xx / lost, for the report

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        self.by_kind.setdefault(kind, {}).setdefault(outcome, 0)
        self.by_kind[kind][outcome] += 1
        if outcome in ("5xx", "lost") and len(self.errors) < 20:
            self.errors.append(f"{kind}: {detail}")


class Workload:
    """Seeded request specs over natural text (token ids, so prompt lengths are exact)."""

    def __init__(self, tokenizer, max_model_len: int, seed: int):
        from duo_vllm.testing.haystack import encoded_text

        self.rng = random.Random(seed)
        self.corpus = encoded_text(tokenizer)
        self.tokenizer = tokenizer
        self.long_len = max_model_len - MAX_TOKENS - 8
        # shared by every multi-turn conversation: a quarter of the context, so 3 turns still fit
        self.system = tokenizer.decode(self.corpus[:max_model_len // 4])
        self.probes = [self.tokens(n, offset=97 * i) for i, n in
                       enumerate([24, 200] + [self.long_len] * (PROBES - 2))]
        self.bag: list[str] = []  # kinds still to draw in this round of the mix

    def next_kind(self) -> str:
        """Kinds drawn from a shuffled bag of the weights: every ``sum(KINDS.values())`` requests
        hold each kind exactly as often as its weight, so a short run still has the whole mix."""
        if not self.bag:
            self.bag = [k for k, w in KINDS.items() for _ in range(w)]
            self.rng.shuffle(self.bag)
        return self.bag.pop()

    def tokens(self, n: int, offset: int | None = None) -> list[int]:
        start = self.rng.randrange(0, len(self.corpus) - n) if offset is None else offset
        return list(self.corpus[start:start + n])

    def text(self, n: int) -> str:
        return self.tokenizer.decode(self.tokens(n))

    def next(self) -> tuple[str, dict]:
        kind = self.next_kind()
        r = self.rng
        spec = {"max_tokens": r.randint(4, MAX_TOKENS)}
        if kind == "long":
            spec["prompt"] = self.tokens(self.long_len)
        elif kind in ("short", "n2", "seeded", "stream", "disconnect", "abort"):
            spec["prompt"] = self.tokens(r.randint(16, 256) if kind != "abort" else r.randint(256, self.long_len))
        elif kind in ("chat", "multiturn"):
            spec["question"] = self.text(r.randint(8, 64))
            spec["stream"] = r.random() < 0.5
        if kind == "seeded":
            spec["seed"] = r.randrange(2**31)
        if kind == "abort":
            spec["give_up_s"] = r.uniform(0.3, 2.0)
        if kind == "disconnect":
            spec["chunks"] = r.randint(1, 3)
            spec["max_tokens"] = MAX_TOKENS
        if kind == "probe":
            spec = {"probe": r.randrange(len(self.probes))}
        return kind, spec


async def probe_text(client, model: str, prompt: list[int]) -> str:
    r = await client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    return r.choices[0].text


async def run_one(client, model: str, kind: str, spec: dict, work: Workload, reference: list[str]) -> tuple[str, str]:
    """(outcome, detail) of one request."""
    import openai

    try:
        if kind == "probe":
            text = await probe_text(client, model, work.probes[spec["probe"]])
            if text != reference[spec["probe"]]:
                return "completed", f"MISMATCH probe {spec['probe']}: {text!r} vs {reference[spec['probe']]!r}"
            return "completed", ""
        if kind == "abort":
            try:
                await asyncio.wait_for(client.completions.create(
                    model=model, prompt=spec["prompt"], max_tokens=spec["max_tokens"], temperature=0),
                    timeout=spec["give_up_s"])
                return "completed", ""
            except (asyncio.TimeoutError, openai.APITimeoutError):
                return "aborted", ""
        if kind == "disconnect":
            stream = await client.completions.create(model=model, prompt=spec["prompt"], stream=True,
                                                     max_tokens=spec["max_tokens"], temperature=0.8,
                                                     extra_body={"ignore_eos": True})
            got = 0
            async for _ in stream:
                got += 1
                if got >= spec["chunks"]:
                    break
            await stream.close()
            return "aborted", ""
        if kind in ("chat", "multiturn"):
            return await chat(client, model, kind, spec, work)
        params = dict(model=model, prompt=spec["prompt"], max_tokens=spec["max_tokens"])
        if kind == "stream":
            stream = await client.completions.create(stream=True, temperature=0.7, **params)
            finish = None
            async for chunk in stream:
                finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            return ("completed", "") if finish in ("stop", "length") else ("lost", "stream ended without a finish reason")
        extra = {"n": 2, "temperature": 0.9} if kind == "n2" else {"temperature": 1.0, "seed": spec["seed"]} \
            if kind == "seeded" else {"temperature": 0}
        r = await client.completions.create(**params, **extra)
        want = extra.get("n", 1)
        if len(r.choices) != want or any(c.finish_reason not in ("stop", "length") for c in r.choices):
            return "lost", f"{len(r.choices)} choices, finish {[c.finish_reason for c in r.choices]}"
        return "completed", ""
    except openai.APIStatusError as exc:
        return ("5xx" if exc.status_code >= 500 else "4xx"), f"{exc.status_code} {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 - every other end is a lost request, reported
        return "lost", f"{type(exc).__name__}: {str(exc)[:200]}"


async def chat(client, model: str, kind: str, spec: dict, work: Workload) -> tuple[str, str]:
    messages = [{"role": "system", "content": work.system}] if kind == "multiturn" else []
    turns = 3 if kind == "multiturn" else 1
    for turn in range(turns):
        messages.append({"role": "user", "content": spec["question"] if turn == 0 else work.text(16)})
        if spec["stream"]:
            stream = await client.chat.completions.create(model=model, messages=messages, stream=True,
                                                          max_tokens=spec["max_tokens"], temperature=0.7)
            parts, finish = [], None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            text = "".join(parts)
        else:
            r = await client.chat.completions.create(model=model, messages=messages,
                                                     max_tokens=spec["max_tokens"], temperature=0.7)
            text, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
        if finish not in ("stop", "length"):
            return "lost", f"chat turn {turn} finish {finish!r}"
        messages.append({"role": "assistant", "content": text})
    return "completed", ""
