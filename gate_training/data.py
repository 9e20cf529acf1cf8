"""Synthetic multi-passkey retrieval data for gate training, as a Hugging Face ``datasets`` table.

Why this task: the gates must find the heads whose removal of long-range context changes the
model's output. Passkeys (random word sequences) hidden at random depths of natural text, asked
for at the end, force the model to read far back; supervising only the answer positions makes
the distillation signal come from exactly those long-range reads (DuoAttention, section 3.2).

Each sample is::

    [haystack ... " The pass key 1 is: w1 .. wL. Remember it. " ... haystack ... (x num_passkeys)]
    "\\n\\nWhat are the pass keys in the text above? List them in order.\\nAnswer:"
    " The pass key 1 is: w1 .. wL. The pass key 2 is: ..."      <- supervised answer

with the haystack cut at a random offset from public-domain prose (``duo_vllm.testing.haystack``,
the default) or from the user's own text files (``PasskeySpec.haystack``: e.g. code for a code
model, so the gates learn which heads read far back in the text the model will serve), passkeys
inserted after a sentence end near random depths, and context lengths (haystack + passkeys,
before the question) drawn from ``num_lengths`` equal intervals of
[min_context, max_context]. Every sample is a pure function of (seed, index), so a dataset is
reproducible; it is cached on disk with ``Dataset.save_to_disk`` under a key of all the inputs.

Columns: ``input_ids`` (list[int]), ``answer_start`` (index of the first answer token),
``context_length``, ``depths`` (list[float], insertion depth of each passkey in [0, 1]),
``passkeys`` (list[str]), ``passkey_positions`` (list[int], index in ``input_ids`` of each
inserted passkey sentence), ``sample_index``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from duo_vllm.testing.haystack import encoded_text, sentence_end_ids, special_prefix, word_pool
from gate_training.config import GateTrainingError

logger = logging.getLogger(__name__)

DATA_VERSION = 1
NEEDLE_TEMPLATE = " The pass key {number} is: {words}. Remember it. "
QUESTION = "\n\nWhat are the pass keys in the text above? List them in order.\nAnswer:"
ANSWER_ITEM = " The pass key {number} is: {words}."
_EVAL_INDEX = 1_000_003  # sample index of the held-out evaluation sample
_SNAP_WINDOW = 96  # tokens searched after a depth for a sentence end to insert at
MIN_PASSKEY_WORDS = 100  # distinct haystack words passkeys are drawn from, at least

__all__ = [
    "DATA_VERSION",
    "PasskeySpec",
    "build_passkey_dataset",
    "make_sample",
    "eval_sample",
    "eval_samples",
    "describe_haystack",
    "load_haystack",
    "word_pool",
]


@dataclass(frozen=True)
class PasskeySpec:
    """Parameters of a passkey dataset (everything that changes its content)."""

    num_samples: int
    min_context: int
    max_context: int
    num_lengths: int = 50
    num_passkeys: int = 10
    passkey_length: int = 32
    seed: int = 42
    haystack: str | None = None  # text file or folder of *.txt; None: the Canterbury corpus

    def length_edges(self) -> np.ndarray:
        """``num_lengths + 1`` integer edges splitting [min_context, max_context] evenly."""
        return np.linspace(self.min_context, self.max_context, self.num_lengths + 1).round().astype(int)


def load_haystack(path: str | os.PathLike | None = None) -> str:
    """The haystack text: the files at ``path`` as written (a UTF-8 text file, or a folder whose
    ``*.txt`` files, subfolders included, are read in path order and joined by blank lines), by
    default the Canterbury corpus (its hard-wrapped lines joined into paragraphs). Raises
    :class:`GateTrainingError` saying how to fix a missing, empty or undecodable haystack."""
    if path is not None:
        return _read_haystack(str(Path(path).expanduser().resolve()))
    from duo_vllm.testing.haystack import CANTERBURY_FILES, corpus_dir, haystack_text

    try:
        return haystack_text()
    except (FileNotFoundError, OSError) as exc:
        logger.debug("haystack fetch failed: %s", exc)
        raise GateTrainingError(
            f"the haystack text is missing from {corpus_dir()} and could not be fetched from the "
            "package registry (`pip download --no-binary :all: brotli==1.2.1` failed). Run "
            "`python -m duo_vllm.testing prepare` where the registry is reachable, copy the "
            f"Canterbury texts ({', '.join(CANTERBURY_FILES)}) into {corpus_dir()}, or pass your "
            "own text with --haystack"
        ) from None


@lru_cache(maxsize=4)
def _read_haystack(path: str) -> str:
    where = Path(path)
    if where.is_dir():
        files = sorted(f for f in where.rglob("*.txt") if f.is_file())
        if not files:
            raise GateTrainingError(f"--haystack {path} is a folder without .txt files; put the text "
                                    "in .txt files there or pass one text file")
    elif where.is_file():
        files = [where]
    else:
        raise GateTrainingError(f"--haystack {path} does not exist; pass a UTF-8 text file or a folder "
                                "of .txt files (or leave it out for the Canterbury corpus)")
    parts = []
    for file in files:
        try:
            # as written (line breaks and indentation carry meaning in code), only CRLF -> LF
            parts.append(file.read_text(encoding="utf-8").replace("\r\n", "\n").strip("\n"))
        except UnicodeDecodeError as exc:
            raise GateTrainingError(f"haystack file {file} is not UTF-8 text (byte {exc.start}); convert "
                                    "it (e.g. `iconv -t UTF-8`) or leave it out") from None
        except OSError as exc:
            raise GateTrainingError(f"cannot read haystack file {file} ({exc.strerror})") from None
    text = "\n\n".join(p for p in parts if p.strip())
    if not text:
        raise GateTrainingError(f"--haystack {path} holds no text")
    pool = word_pool(text)
    if len(pool) < MIN_PASSKEY_WORDS:
        raise GateTrainingError(
            f"--haystack {path} has {len(pool)} distinct words of 4-10 lowercase letters; passkeys "
            f"are drawn from them and need at least {MIN_PASSKEY_WORDS}: give more (or more "
            "varied) prose"
        )
    return text


def describe_haystack(path: str | os.PathLike | None, tokenizer=None) -> dict[str, Any]:
    """Provenance of a haystack: where it came from, a content hash, and its size."""
    from duo_vllm.testing.haystack import BROTLI_SDIST, encoded_text

    text = load_haystack(path)
    info: dict[str, Any] = {
        "source": (f"Canterbury corpus ({BROTLI_SDIST} sdist)" if path is None
                   else str(Path(path).expanduser().resolve())),
        "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "characters": len(text),
    }
    if tokenizer is not None:
        info["tokens"] = len(encoded_text(tokenizer, text))
    return info


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def make_sample(tokenizer, spec: PasskeySpec, index: int, context_length: int | None = None) -> dict[str, Any]:
    """Sample ``index`` of ``spec`` (deterministic in ``(spec.seed, index)``).

    ``context_length`` overrides the length drawn from the sample's interval.
    """

    text = load_haystack(spec.haystack)
    corpus = encoded_text(tokenizer, text)
    pool = word_pool(text)
    rng = np.random.default_rng([spec.seed, index, DATA_VERSION])
    if context_length is None:
        edges = spec.length_edges()
        interval = index % spec.num_lengths
        context_length = int(rng.integers(edges[interval], edges[interval + 1] + 1))

    passkeys = [" ".join(rng.choice(pool, size=spec.passkey_length)) for _ in range(spec.num_passkeys)]
    needles = [_encode(tokenizer, NEEDLE_TEMPLATE.format(number=n + 1, words=w)) for n, w in enumerate(passkeys)]
    prefix = special_prefix(tokenizer)
    hay_len = context_length - len(prefix) - sum(len(n) for n in needles)
    if hay_len < context_length // 2:
        raise GateTrainingError(
            f"{spec.num_passkeys} passkeys of {spec.passkey_length} words take "
            f"{sum(len(n) for n in needles)} tokens, more than half of a {context_length}-token "
            "context; lower --num-passkeys / --passkey-length or raise --min-context"
        )
    if hay_len > len(corpus):
        raise GateTrainingError(
            f"the haystack has {len(corpus)} tokens for this tokenizer, a {context_length}-token "
            "context needs more; lower --max-context or pass a longer --haystack"
        )
    offset = int(rng.integers(0, len(corpus) - hay_len + 1))
    hay = list(corpus[offset:offset + hay_len])

    ends = sentence_end_ids(tokenizer, corpus)
    raw_depths = np.sort(rng.uniform(0.0, 1.0, size=spec.num_passkeys))
    cuts = []
    for depth in raw_depths:
        pos = int(round(depth * hay_len))
        # insert right after the next sentence end, when one is near
        for cand in range(pos, min(pos + _SNAP_WINDOW, hay_len) + 1):
            if cand == 0 or cand == hay_len or hay[cand - 1] in ends:
                pos = cand
                break
        cuts.append(pos)
    cuts = sorted(cuts)

    input_ids = list(prefix)
    positions = []
    start = 0
    for cut, needle in zip(cuts, needles):
        input_ids += hay[start:cut]
        positions.append(len(input_ids))
        input_ids += needle
        start = cut
    input_ids += hay[start:]
    assert len(input_ids) == context_length, (len(input_ids), context_length)
    input_ids += _encode(tokenizer, QUESTION)
    answer_start = len(input_ids)
    answer = "".join(ANSWER_ITEM.format(number=n + 1, words=w) for n, w in enumerate(passkeys))
    input_ids += _encode(tokenizer, answer)
    return {
        "input_ids": input_ids,
        "answer_start": answer_start,
        "context_length": context_length,
        "depths": [c / hay_len if hay_len else 0.0 for c in cuts],
        "passkeys": passkeys,
        "passkey_positions": positions,
        "sample_index": index,
    }


def eval_sample(tokenizer, spec: PasskeySpec, context_length: int | None = None) -> dict[str, Any]:
    """A held-out sample (never in the training set), by default at ``max_context``."""
    return make_sample(tokenizer, spec, _EVAL_INDEX, context_length or spec.max_context)


def eval_samples(tokenizer, spec: PasskeySpec, count: int) -> list[dict[str, Any]]:
    """``count`` held-out samples with lengths evenly spaced up to ``max_context`` (longest last)."""
    if count == 1:
        return [eval_sample(tokenizer, spec)]
    lengths = np.linspace(spec.min_context, spec.max_context, count).round().astype(int)
    return [make_sample(tokenizer, spec, _EVAL_INDEX + k, int(n)) for k, n in enumerate(lengths)]


def _cache_key(tokenizer, spec: PasskeySpec) -> str:

    corpus = encoded_text(tokenizer, load_haystack(spec.haystack))
    content = asdict(spec)
    del content["haystack"]  # its path: the token hash below is what matters
    identity = {
        "version": DATA_VERSION,
        "spec": content,
        "templates": [NEEDLE_TEMPLATE, QUESTION, ANSWER_ITEM],
        "tokenizer": {
            "name": Path(str(getattr(tokenizer, "name_or_path", ""))).name,
            "vocab": len(tokenizer),
            "probe": _encode(tokenizer, QUESTION + NEEDLE_TEMPLATE),
        },
        "haystack": [len(corpus), hashlib.sha256(np.asarray(corpus, dtype=np.int64).tobytes()).hexdigest()],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def build_passkey_dataset(tokenizer, spec: PasskeySpec, cache_dir: str | os.PathLike | None = None):
    """The training samples of ``spec`` as a ``datasets.Dataset`` (loaded from cache if built before).

    Sample ``i`` comes from interval ``i % num_lengths``; the rows are then shuffled by the seed so
    that consecutive steps see different lengths.
    """
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    key = _cache_key(tokenizer, spec)
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / f"passkeys-{key}"
        if (folder / "dataset_info.json").is_file():
            logger.info("Loading cached passkey data from %s", folder)
            return datasets.load_from_disk(str(folder))

    order = np.random.default_rng([spec.seed, DATA_VERSION]).permutation(spec.num_samples)
    rows = [make_sample(tokenizer, spec, int(i)) for i in order]
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "answer_start": datasets.Value("int32"),
        "context_length": datasets.Value("int32"),
        "depths": datasets.Sequence(datasets.Value("float32")),
        "passkeys": datasets.Sequence(datasets.Value("string")),
        "passkey_positions": datasets.Sequence(datasets.Value("int32")),
        "sample_index": datasets.Value("int32"),
    })
    table = pa.Table.from_pydict({name: [row[name] for row in rows] for name in features},
                                 schema=features.arrow_schema)
    # Our content key is the fingerprint: datasets would otherwise hash the table state with dill,
    # which fails on some Python/pyarrow pairs (Python 3.12 + pyarrow 25: "Can't pickle
    # <class 'MonthDayNano'>"), and the key already names exactly what the rows depend on.
    dataset = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features),
                               fingerprint=key)
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".passkeys-", dir=folder.parent))
        try:
            dataset.save_to_disk(str(staging))
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        logger.info("Cached %d passkey samples in %s", len(dataset), folder)
        dataset = datasets.load_from_disk(str(folder))
    return dataset
