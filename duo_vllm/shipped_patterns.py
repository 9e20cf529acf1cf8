"""Find the shipped pattern for a model, by config fingerprint first and model name second.

Shipped patterns live in the repository's top-level ``patterns/`` folder (installed as the
``duo_vllm_patterns`` package data); ``DUO_VLLM_PATTERNS`` (os.pathsep-separated folders) adds
more places to look, searched first.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from duo_vllm.pattern import HeadPattern, PatternError
from duo_vllm.pattern_io import PATTERN_FILENAME, load_pattern

logger = logging.getLogger(__name__)


def pattern_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("DUO_VLLM_PATTERNS", "").split(os.pathsep) if p]
    source_tree = Path(__file__).resolve().parents[1] / "patterns"
    if source_tree.is_dir():
        dirs.append(source_tree)
    try:
        import duo_vllm_patterns

        dirs.append(Path(next(iter(duo_vllm_patterns.__path__))))
    except ImportError:
        pass
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def shipped_patterns() -> list[HeadPattern]:
    found = []
    for folder in pattern_dirs():
        for path in sorted(folder.glob(f"*/{PATTERN_FILENAME}")):
            try:
                found.append(load_pattern(path))
            except PatternError as exc:  # a broken shipped file must not hide the others
                logger.warning("Skipping unreadable shipped pattern %s: %s", path, exc)
    return found


def _name_key(name: str | None) -> str:
    return (name or "").rstrip("/").rsplit("/", 1)[-1].lower()


def find_shipped_pattern(model_name: str, fingerprint: str) -> HeadPattern | None:
    """The shipped pattern whose fingerprint matches, else one whose model name matches."""
    candidates = shipped_patterns()
    for pattern in candidates:
        if pattern.model_fingerprint == fingerprint:
            return pattern
    for pattern in candidates:
        if pattern.model_fingerprint is None and _name_key(pattern.model_name) == _name_key(model_name):
            return pattern
    return None
