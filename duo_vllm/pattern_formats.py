"""Head-map formats besides our own: their names, the file digest every loaded map carries, and
PruLong's ``masks.tsv`` (a hard 0/1 map, loaded as it is, with no conversion step).

Kept apart from :mod:`duo_vllm.pattern_io` (which dispatches to it) so that neither module grows
past a readable size. Numpy and the standard library only.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from duo_vllm.pattern import HeadPattern, PatternError

__all__ = [
    "FORMAT_DUO_VLLM_JSON",
    "FORMAT_DUOATTENTION_TSV",
    "FORMAT_PRULONG_MASKS",
    "PRULONG_MASKS_FILENAME",
    "is_prulong_masks_name",
    "read_text_and_hash",
    "load_prulong_masks",
    "check_mask_selection",
]

# What HeadPattern.source_format says, in logs and in the KV report.
FORMAT_DUO_VLLM_JSON = "duo-vllm-json"
FORMAT_DUOATTENTION_TSV = "duoattention-tsv"
FORMAT_PRULONG_MASKS = "prulong-masks-tsv"
PRULONG_MASKS_FILENAME = "masks.tsv"
HASH_DIGITS = 12

_MASKS_FIX = (
    f"a PruLong {PRULONG_MASKS_FILENAME} holds one row per layer of tab-separated 0/1 values, one per "
    "KV head (1 = full-attention head); fix the file or re-export it with PruLong's "
    "save_prulong_masks.py --checkpoint CKPT"
)


def is_prulong_masks_name(name: str) -> bool:
    """PruLong's ``save_prulong_masks.py`` writes ``masks.tsv``, or ``masks_sp{sparsity}.tsv`` when
    asked to round the mask to a sparsity."""
    return name == PRULONG_MASKS_FILENAME or (name.startswith("masks_sp") and name.endswith(".tsv"))


def read_text_and_hash(path: Path, what: str = "pattern file") -> tuple[str, str]:
    """The file's UTF-8 text and the first 12 hex digits of the sha256 of its bytes (what
    ``sha256sum FILE | cut -c1-12`` prints), read in one go so both describe the same bytes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PatternError(f"cannot read {what} {path}: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PatternError(
            f"{what} {path} is not UTF-8 text; point to a duo_pattern.json or "
            f"full_attention_heads.tsv (or a PruLong {PRULONG_MASKS_FILENAME}) file"
        ) from None
    return text, hashlib.sha256(data).hexdigest()[:HASH_DIGITS]


def _parse_masks(path: Path, text: str) -> np.ndarray:
    """Rows of exactly 0 or 1, every error naming its line and column."""
    rows: list[list[float]] = []
    first_line = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue  # blank lines and trailing whitespace are tolerated
        cells = line.split("\t") if "\t" in line else line.split()
        row: list[float] = []
        for col, cell in enumerate(cells, start=1):
            try:
                value = float(cell)
            except ValueError:
                value = math.nan  # not a number at all: the same message as NaN
            if value not in (0.0, 1.0):  # also NaN, inf and gate values such as 0.5
                raise PatternError(
                    f"{path}, line {lineno}, column {col}: {cell.strip()!r} is not 0 or 1; "
                    f"{_MASKS_FIX} (trained gate values belong in full_attention_heads.tsv, "
                    "with the training config.json beside it)"
                )
            row.append(value)
        if rows and len(row) != len(rows[0]):
            raise PatternError(
                f"{path}, line {lineno}: {len(row)} values but line {first_line} has "
                f"{len(rows[0])}; every layer row needs one value per KV head, {_MASKS_FIX}"
            )
        if not rows:
            first_line = lineno
        rows.append(row)
    if not rows:
        raise PatternError(f"{path} holds no mask rows (empty file); {_MASKS_FIX}")
    return np.asarray(rows, dtype=np.float32)


def load_prulong_masks(path: Path) -> HeadPattern:
    """PruLong's ``masks.tsv``: the 0/1 values become the gates, so ranking them reproduces the
    mask exactly at its own sparsity (the share of 0s), which becomes the pattern's default.

    The file records no sink/recent: ``sink_size``/``recent_size`` stay None, and the served window
    is the ``sink``/``recent`` options or their defaults (the start-up line says which). A
    ``config.json`` beside it is not read: in a PruLong output folder that is the model's own.
    """
    if not path.is_file():
        raise PatternError(f"{PRULONG_MASKS_FILENAME} not found at {path}; point to PruLong's masks.tsv")
    text, digest = read_text_and_hash(path, "head mask file")
    gates = _parse_masks(path, text)
    num_streaming = int((gates == 0.0).sum())
    return HeadPattern(
        gates=gates,
        sink_size=None,
        recent_size=None,
        model_name=None,
        model_fingerprint=None,
        sparsity=num_streaming / gates.size,
        provenance={"source_format": FORMAT_PRULONG_MASKS, "window": "not recorded in the file"},
        source=str(path),
        source_format=FORMAT_PRULONG_MASKS,
        content_hash=digest,
    )


def check_mask_selection(pattern: HeadPattern, sparsity: float | None) -> None:
    """Refuse a sparsity a hard 0/1 mask cannot give without guessing.

    Its heads are tied within the 0s and within the 1s, so any count of streaming heads other than
    the mask's own (or none, or all) would be picked by position, not by training. Serving that
    silently would look like a trained pattern; asking the user is the honest answer.
    """
    if sparsity is None or pattern.source_format != FORMAT_PRULONG_MASKS:
        return
    total = pattern.gates.size
    own = int((pattern.gates == 0.0).sum())
    wanted = min(total, int(math.floor(sparsity * total + 0.5)))
    if wanted in (0, own, total):
        return
    raise PatternError(
        f"{pattern.source} is a hard 0/1 head mask ({own} of {total} KV heads stream: sparsity "
        f"{own / total:.4g}); sparsity {sparsity:.4g} asks for {wanted} streaming heads, which the "
        "mask cannot rank (its heads are tied), so they would be chosen by position. Leave out "
        "the sparsity/retrieval_ratio option to serve the mask as trained, or ask for 0 (all "
        "retrieval) or 1 (all streaming)."
    )
