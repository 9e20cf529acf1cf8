"""Public-domain natural text for long-context tests ("haystacks").

Synthetic long-context tasks need real prose around the needles: random tokens make attention
patterns that no trained head ever sees. No registry ships long-context benchmarks, but the
``brotli==1.2.1`` source distribution carries the Canterbury corpus (Alice in Wonderland, As You
Like It, Paradise Lost, a Gutenberg e-text: all public domain, ~300K tokens). It is fetched once
from the package registry into the cache and read from there.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from duo_vllm.testing.models import cache_root

logger = logging.getLogger(__name__)

BROTLI_SDIST = "brotli==1.2.1"
CANTERBURY_FILES = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")


def corpus_dir() -> Path:
    return cache_root() / "texts" / "canterbury"


def fetch_corpus() -> Path:
    """Download the brotli sdist once and keep its Canterbury texts; returns their folder."""
    target = corpus_dir()
    if all((target / name).is_file() for name in CANTERBURY_FILES):
        return target
    logger.info("Fetching the Canterbury corpus from the %s sdist (once)...", BROTLI_SDIST)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", tmp, BROTLI_SDIST]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise FileNotFoundError(
                f"Could not download the haystack text ({' '.join(cmd)} failed: "
                f"{result.stderr.strip()[-400:]}). Run it where the package registry is reachable, "
                f"or place {', '.join(CANTERBURY_FILES)} in {target}."
            )
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()
                       if "testdata" in m.name and Path(m.name).name in CANTERBURY_FILES}
            missing = set(CANTERBURY_FILES) - set(members)
            if missing:
                raise FileNotFoundError(f"{archives[0].name} lacks {sorted(missing)}")
            for name, member in members.items():
                data = tar.extractfile(member).read()
                (target / name).write_bytes(data)
    return target


def normalise_text(raw: str) -> str:
    """Paragraphs (blank-line separated) with their line breaks and runs of whitespace made single
    spaces: hard-wrapped e-texts then read as prose, not as verse."""
    paragraphs = [" ".join(p.split()) for p in raw.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


@lru_cache(maxsize=1)
def haystack_text() -> str:
    """All corpus texts joined by blank lines, whitespace-normalised within paragraphs."""
    folder = fetch_corpus()
    return "\n\n".join(normalise_text((folder / name).read_text(encoding="latin-1")) for name in CANTERBURY_FILES)


def haystack_tokens(tokenizer, num_tokens: int, *, offset: int = 0) -> list[int]:
    """Return ``num_tokens`` token ids of natural text, starting ``offset`` tokens into the corpus.

    ``tokenizer`` is any Hugging Face tokenizer (or an object with ``encode``); no special tokens
    are added. Raises ``ValueError`` when the corpus is shorter than asked.
    """
    if num_tokens < 0 or offset < 0:
        raise ValueError(f"num_tokens and offset must be >= 0, got {num_tokens} and {offset}")
    ids = encoded_text(tokenizer)
    if offset + num_tokens > len(ids):
        raise ValueError(
            f"The haystack has {len(ids)} tokens for this tokenizer; asked for {num_tokens} "
            f"from offset {offset}. Use a shorter context or a smaller offset."
        )
    return list(ids[offset:offset + num_tokens])


# (id(tokenizer), id(text)) -> (tokenizer, text, ids). Holding both keeps their ids from being
# reused by other objects while the entry exists, which would hand back the wrong token ids.
_ENCODED: dict[tuple[int, int], tuple[object, str, Sequence[int]]] = {}


def encoded_text(tokenizer, text: str | None = None) -> Sequence[int]:
    """Token ids (no special tokens) of ``text``, by default the corpus; encoded once per
    tokenizer and text object."""
    text = haystack_text() if text is None else text
    key = (id(tokenizer), id(text))
    entry = _ENCODED.get(key)
    if entry is None or entry[0] is not tokenizer or entry[1] is not text:
        entry = _ENCODED[key] = (tokenizer, text, tokenizer.encode(text, add_special_tokens=False))
    return entry[2]


# Text endings after which a needle reads as a new sentence of the prose.
SENTENCE_END = (".", "!", "?", "\n", ".'", ".\"", "?'", "!'")

_POOLS: dict[int, list[str]] = {}


def word_pool(text: str | None = None) -> list[str]:
    """Distinct lowercase words (4-10 letters) of ``text`` (default: the corpus), sorted: a
    vocabulary for passkeys, needle keys and word lists that the model has seen as prose."""
    text = haystack_text() if text is None else text
    key = hash(text)
    if key not in _POOLS:
        _POOLS[key] = sorted({w for w in re.findall(r"\b[a-z]{4,10}\b", text) if w.isascii()})
    return _POOLS[key]


_BOUNDARIES: dict[tuple[int, int], set[int]] = {}  # the ids stay alive in the encoding cache


def sentence_end_ids(tokenizer, ids: Sequence[int]) -> set[int]:
    """Token ids among ``ids`` whose text ends a sentence (cached per tokenizer and id list):
    insertion points for needles, so they never split a word."""
    key = (id(tokenizer), id(ids))
    if key not in _BOUNDARIES:
        unique = sorted(set(ids))
        texts = tokenizer.batch_decode([[i] for i in unique])
        _BOUNDARIES[key] = {i for i, t in zip(unique, texts) if t.rstrip(" ").endswith(SENTENCE_END)}
    return _BOUNDARIES[key]


def special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before text (e.g. BOS for Llama); empty for SmolLM2 / Qwen2: what a
    prompt assembled from separately encoded pieces must start with."""
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    without = list(tokenizer.encode("a", add_special_tokens=False))
    if with_special[-len(without):] == without:
        return with_special[: len(with_special) - len(without)]
    return []
