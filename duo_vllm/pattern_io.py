"""Pattern files: our self-describing ``duo_pattern.json``, the original DuoAttention output
(``full_attention_heads.tsv`` + ``config.json``) and PruLong's ``masks.tsv``
(:mod:`duo_vllm.pattern_formats`), read into a :class:`~duo_vllm.pattern.HeadPattern` that records
its format and file digest; ours is written back bit for bit. Every unreadable file is a
:class:`~duo_vllm.pattern.PatternError` naming the fix. Numpy and the standard library only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from duo_vllm.pattern import (
    _HOW_TO_GET_PATTERN,
    HeadPattern,
    PatternError,
    _check_sparsity,
    _first_non_finite,
    _is_int,
    _is_real,
)
from duo_vllm.pattern_formats import (
    FORMAT_DUO_VLLM_JSON,
    FORMAT_DUOATTENTION_TSV,
    PRULONG_MASKS_FILENAME,
    is_prulong_masks_name,
    load_prulong_masks,
    read_text_and_hash,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PATTERN_FILENAME",
    "ORIGINAL_GATES_FILENAME",
    "ORIGINAL_CONFIG_FILENAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PRULONG_MASKS_FILENAME",
    "find_pattern_file",
    "load_pattern",
    "save_pattern",
]

PATTERN_FILENAME = "duo_pattern.json"
ORIGINAL_GATES_FILENAME = "full_attention_heads.tsv"
ORIGINAL_CONFIG_FILENAME = "config.json"
FORMAT_NAME = "duo-vllm-pattern"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------


def _read_json(path: Path, text: str | None = None) -> Any:
    text = read_text_and_hash(path)[0] if text is None else text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PatternError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}); fix or regenerate the file"
        ) from None
    except (ValueError, RecursionError) as exc:  # an integer over 4300 digits, or nesting too deep
        raise PatternError(
            f"{path} is not usable JSON (a number with too many digits or nesting too deep: "
            f"{type(exc).__name__}); fix or regenerate the file"
        ) from None


def _parse_tsv(path: Path, text: str) -> np.ndarray:
    """Parse ``full_attention_heads.tsv`` with line numbers in every error."""
    rows: list[list[float]] = []
    width: int | None = None
    first_line = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        cells = line.split("\t") if "\t" in line else line.split()
        row: list[float] = []
        for col, cell in enumerate(cells):
            try:
                row.append(float(cell))
            except ValueError:
                raise PatternError(
                    f"{path}, line {lineno}, column {col + 1}: {cell.strip()!r} is not "
                    "a number; the file must hold tab-separated floats (one row per "
                    "layer), fix or regenerate it"
                ) from None
        if width is None:
            width, first_line = len(row), lineno
        elif len(row) != width:
            raise PatternError(
                f"{path}, line {lineno}: {len(row)} values but line {first_line} has "
                f"{width}; every layer row needs one value per KV head, fix or "
                "regenerate the file"
            )
        rows.append(row)
    if not rows:
        raise PatternError(f"{path} contains no gate values; regenerate the file")
    gates = np.asarray(rows, dtype=np.float64)
    bad = _first_non_finite(gates)
    if bad is not None:
        layer, head = bad
        raise PatternError(
            f"{path}: non-finite gate ({gates[layer, head]}) at layer {layer}, KV head "
            f"{head}; retrain the gates or fix the pattern file"
        )
    return gates


def _opt_int(config: Mapping[str, Any], key: str, path: Path) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if _is_int(value) or (_is_real(value) and float(value).is_integer()):
        return int(value)
    raise PatternError(f"{path}: {key} must be an integer, got {value!r}")


def _load_original(tsv_path: Path, config_path: Path) -> HeadPattern:
    """Original DuoAttention output: gates TSV + training config.json."""
    if not tsv_path.is_file():
        raise PatternError(
            f"{ORIGINAL_GATES_FILENAME} not found at {tsv_path}; point to the output "
            "directory of a DuoAttention training run"
        )
    if not config_path.is_file():
        raise PatternError(
            f"{ORIGINAL_CONFIG_FILENAME} not found next to {tsv_path} (looked for "
            f"{config_path}); copy the config.json of the same training run there (a PruLong "
            f"0/1 mask needs no config.json: name it {PRULONG_MASKS_FILENAME})"
        )
    text, digest = read_text_and_hash(tsv_path)
    gates = _parse_tsv(tsv_path, text)
    # Same as the reference loader: trained gates undershoot 0 slightly.
    gates = np.clip(gates, 0.0, 1.0).astype(np.float32)
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise PatternError(
            f"{config_path} must hold a JSON object with the training arguments"
        )
    if _is_model_config(config):
        # Gates dropped into a model folder: the config.json there describes the model, not the
        # training run, so it gives no window, sparsity or name.
        logger.info("%s is the model's config, not a training record: the gates in %s carry no "
                    "sink/recent or sparsity", config_path, tsv_path.name)
        config = {}
    sparsity = config.get("sparsity")
    if sparsity is not None:
        sparsity = _check_sparsity(sparsity, f"sparsity in {config_path}")
    model_name = config.get("model_name")
    return HeadPattern(
        gates=gates,
        sink_size=_opt_int(config, "sink_size", config_path),
        recent_size=_opt_int(config, "recent_size", config_path),
        model_name=str(model_name) if model_name is not None else None,
        model_fingerprint=None,
        sparsity=sparsity,
        provenance=dict(config),
        source=str(tsv_path),
        source_format=FORMAT_DUOATTENTION_TSV,
        content_hash=digest,
    )


def _is_model_config(config: Mapping[str, Any]) -> bool:
    """A Hugging Face model config (what a model folder's config.json holds), not DuoAttention's
    training arguments."""
    training_keys = ("sink_size", "recent_size", "sparsity", "model_name")
    return ("architectures" in config or "model_type" in config) and not any(
        k in config for k in training_keys)


def _load_ours(path: Path) -> HeadPattern:
    text, digest = read_text_and_hash(path)
    data = _read_json(path, text)
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise PatternError(
            f"{path} is not a duo-vllm pattern (expected a JSON object with "
            f'"format": "{FORMAT_NAME}"); write it with save_pattern()'
        )
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise PatternError(
            f"{path} has pattern format version {version!r}, this duo_vllm reads "
            f"version {FORMAT_VERSION}; upgrade duo_vllm or re-save the pattern"
        )
    if "gates" not in data:
        raise PatternError(f'{path} has no "gates" entry; regenerate the file')
    gates = data["gates"]
    if not isinstance(gates, list) or not all(isinstance(r, list) for r in gates):
        raise PatternError(
            f'{path}: "gates" must be a list of rows (one list of floats per layer)'
        )
    if not gates or not gates[0]:
        raise PatternError(f'{path}: "gates" is empty; regenerate the file')
    for i, row in enumerate(gates):
        for j, value in enumerate(row):
            if not _is_real(value):
                raise PatternError(
                    f'{path}: "gates" row {i}, column {j} is {value!r}, not a number; '
                    "fix or regenerate the file"
                )
    widths = {len(r) for r in gates}
    if len(widths) > 1:
        first = len(gates[0])
        bad_row = next(i for i, r in enumerate(gates) if len(r) != first)
        raise PatternError(
            f'{path}: "gates" row {bad_row} has {len(gates[bad_row])} values but row 0 '
            f"has {first}; every layer needs one value per KV head"
        )
    try:
        pattern = HeadPattern(
            gates=np.asarray(gates, dtype=np.float64),
            sink_size=data.get("sink_size"),
            recent_size=data.get("recent_size"),
            model_name=data.get("model_name"),
            model_fingerprint=data.get("model_fingerprint"),
            sparsity=data.get("sparsity"),
            provenance=data.get("provenance") or {},
            source=str(path),
            source_format=FORMAT_DUO_VLLM_JSON,
            content_hash=digest,
        )
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an integer beyond float range
        if isinstance(exc, PatternError):
            raise PatternError(f"{path}: {exc}") from None
        raise PatternError(f"{path}: invalid gates ({exc}); regenerate the file") from None
    for key, actual in (("num_layers", pattern.num_layers), ("num_kv_heads", pattern.num_kv_heads)):
        declared = data.get(key)
        if declared is not None and declared != actual:
            raise PatternError(
                f"{path}: {key} says {declared!r} but gates have shape "
                f"{tuple(pattern.gates.shape)}; the file is inconsistent, regenerate it"
            )
    return pattern


_LOOKED_FOR = (f"{PATTERN_FILENAME}, {ORIGINAL_GATES_FILENAME} + {ORIGINAL_CONFIG_FILENAME}, "
               f"or {PRULONG_MASKS_FILENAME}")


def find_pattern_file(directory: Path) -> Path | None:
    """The head-map file a folder offers, first found in this order: ``duo_pattern.json``, the
    original ``full_attention_heads.tsv`` (its ``config.json`` beside it), PruLong's ``masks.tsv``.
    A map the user wrote for us wins over a converted one, and trained gates over a hard 0/1 mask."""
    candidates = [directory / name for name in
                  (PATTERN_FILENAME, ORIGINAL_GATES_FILENAME, PRULONG_MASKS_FILENAME)]
    present = [c for c in candidates if c.is_file()]
    if len(present) > 1:
        logger.info("%s holds %s; reading %s (duo_pattern.json, then full_attention_heads.tsv, "
                    "then masks.tsv)", directory, ", ".join(c.name for c in present), present[0].name)
    return present[0] if present else None


def load_pattern(path: str | os.PathLike[str]) -> HeadPattern:
    """Load a head pattern in any supported format.

    Parameters
    ----------
    path : str or PathLike
        A directory (see :func:`find_pattern_file` for which file it reads) or a direct path to a
        ``duo_pattern.json``, a ``full_attention_heads.tsv`` or its ``config.json``, or a PruLong
        ``masks.tsv``.

    Returns
    -------
    HeadPattern
        Original-format gates are clipped to [0, 1] like the reference loader; our format is
        returned exactly as saved; a ``masks.tsv`` gives 0/1 gates and no sink/recent. Every
        pattern names its ``source_format`` and ``content_hash``.
    """
    try:
        p = Path(path).expanduser()
        is_dir, is_file = p.is_dir(), p.is_file()
    except (OSError, RuntimeError, ValueError) as exc:  # a name too long, "~user" unknown, "~\0"
        raise PatternError(
            f"head pattern path {path!r} cannot be used ({getattr(exc, 'strerror', None) or exc}); "
            f"pass the path of a pattern directory or file"
        ) from None
    if is_dir:
        found = find_pattern_file(p)
        if found is None:
            rounded = sorted(c.name for c in p.glob("masks_sp*.tsv"))
            hint = f"point to one of {rounded} itself, or " if rounded else ""
            raise PatternError(
                f"no head pattern in directory {p}: looked for {_LOOKED_FOR}; {hint}"
                f"{_HOW_TO_GET_PATTERN}"
            )
        p = found
    elif not is_file:
        raise PatternError(
            f"head pattern path {p} does not exist (expected a directory holding {_LOOKED_FOR}, "
            f"or a path to one of those files); {_HOW_TO_GET_PATTERN}"
        )
    if is_prulong_masks_name(p.name):
        pattern = load_prulong_masks(p)
    elif p.suffix.lower() == ".tsv":
        pattern = _load_original(p, p.parent / ORIGINAL_CONFIG_FILENAME)
    elif p.name == ORIGINAL_CONFIG_FILENAME and (p.parent / ORIGINAL_GATES_FILENAME).is_file():
        pattern = _load_original(p.parent / ORIGINAL_GATES_FILENAME, p)
    elif p.suffix.lower() == ".json":
        pattern = _load_ours(p)
    else:
        raise PatternError(
            f"don't know how to read {p}: pass a directory, a {PATTERN_FILENAME}, a "
            f"{ORIGINAL_GATES_FILENAME} or a {PRULONG_MASKS_FILENAME}"
        )
    logger.debug("loaded %s", pattern.describe())
    return pattern


# --------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_pattern(
    pattern: HeadPattern,
    directory: str | os.PathLike[str],
    overwrite: bool = False,
) -> Path:
    """Write ``pattern`` as ``<directory>/duo_pattern.json``.

    Gates are written as the shortest decimal of each float32 value, so
    :func:`load_pattern` returns a bit-identical float32 array.

    Returns
    -------
    Path
        The file written.
    """
    if not isinstance(pattern, HeadPattern):
        raise PatternError(f"save_pattern needs a HeadPattern, got {type(pattern).__name__}")
    d = Path(directory).expanduser()
    if d.exists() and not d.is_dir():
        raise PatternError(f"{d} exists and is not a directory; pass a directory path")
    target = d / PATTERN_FILENAME
    if target.exists() and not overwrite:
        raise PatternError(
            f"{target} already exists; pass overwrite=True to replace it or choose "
            "another directory"
        )
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_name": pattern.model_name,
        "model_fingerprint": pattern.model_fingerprint,
        "num_layers": pattern.num_layers,
        "num_kv_heads": pattern.num_kv_heads,
        "sink_size": pattern.sink_size,
        "recent_size": pattern.recent_size,
        "sparsity": pattern.sparsity,
    }
    try:
        provenance_text = json.dumps(
            pattern.provenance, indent=2, sort_keys=True, default=_json_default
        )
    except (TypeError, ValueError) as exc:
        raise PatternError(
            f"pattern provenance is not JSON serialisable ({exc}); store only "
            "strings, numbers, lists and dicts in it"
        ) from None
    # float32 -> Python float is exact; json writes repr(), which round-trips.
    rows = [
        "    " + json.dumps(row, allow_nan=False)
        for row in pattern.gates.astype(np.float32).tolist()
    ]
    parts = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
    parts.append('  "gates": [\n' + ",\n".join(rows) + "\n  ]")
    parts.append('  "provenance": ' + provenance_text.replace("\n", "\n  "))
    text = "{\n" + ",\n".join(parts) + "\n}\n"

    d.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{PATTERN_FILENAME}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PatternError(f"cannot write {target}: {exc}") from None
    logger.info("saved %dx%d head pattern to %s", pattern.num_layers, pattern.num_kv_heads, target)
    return target
