"""Per-head DuoAttention patterns: loading, saving, binarising and sharding.

DuoAttention trains one gate value ``alpha`` per (layer, KV head).  At deployment
a head with a high gate keeps the full KV cache ("retrieval" head) and a head
with a low gate only keeps the attention sinks plus a recent window
("streaming" head).  Everything that turns the trained gates into the boolean
layout the attention backend needs lives here, so that it can be tested
without vLLM or a GPU:

* reading the original DuoAttention output (``full_attention_heads.tsv`` +
  ``config.json``) and our own self-describing ``duo_pattern.json``;
* turning gates into a retrieval mask deterministically (the reference adds
  random noise before taking a quantile, which makes the head count and the
  chosen heads vary between runs);
* mapping the KV-head mask onto query heads (GQA) and onto the KV heads a
  tensor-parallel rank owns;
* checking that a pattern belongs to the model being served.

This module deliberately depends on numpy and the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "PATTERN_FILENAME",
    "ORIGINAL_GATES_FILENAME",
    "ORIGINAL_CONFIG_FILENAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PatternError",
    "HeadPattern",
    "load_pattern",
    "save_pattern",
    "binarize",
    "kv_to_query_heads",
    "shard_for_tensor_parallel",
    "model_fingerprint",
    "validate_for_model",
    "retrieval_stats",
]

PATTERN_FILENAME = "duo_pattern.json"
ORIGINAL_GATES_FILENAME = "full_attention_heads.tsv"
ORIGINAL_CONFIG_FILENAME = "config.json"
FORMAT_NAME = "duo-vllm-pattern"
FORMAT_VERSION = 1

_HOW_TO_GET_PATTERN = (
    "train one with `python -m gate_training --model MODEL` or point the plugin "
    'at a matching pattern with --additional-config \'{"duo": {"pattern": PATH}}\''
)


class PatternError(ValueError):
    """A head pattern (file, values or parameters) cannot be used as given.

    Raised with a single message that says what is wrong and how to fix it, so
    that it can be shown to the user verbatim at engine start-up.
    """


# --------------------------------------------------------------------------
# small validation helpers
# --------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _first_non_finite(values: np.ndarray) -> tuple[int, int] | None:
    bad = np.argwhere(~np.isfinite(values))
    if bad.size == 0:
        return None
    layer, head = (int(i) for i in bad[0])
    return layer, head


def _as_2d(values: Any, what: str, dtype: Any = None) -> np.ndarray:
    """Convert ``values`` to a non-empty 2-D array or raise PatternError."""
    try:
        arr = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise PatternError(
            f"{what} must be a rectangular [num_layers, num_kv_heads] array of numbers "
            f"({exc}); fix the data so every layer has the same number of heads"
        ) from None
    if arr.ndim != 2:
        raise PatternError(
            f"{what} must be 2-D [num_layers, num_kv_heads], got shape {arr.shape}; "
            "pass one row per layer and one column per KV head"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise PatternError(
            f"{what} is empty (shape {arr.shape}); a pattern needs at least one layer "
            "and one KV head"
        )
    return arr


def _as_gates(values: Any, what: str = "gates") -> np.ndarray:
    """Non-empty, finite, 2-D float32 copy of ``values``."""
    arr = _as_2d(values, what)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ):
        raise PatternError(
            f"{what} must contain numbers, got dtype {arr.dtype}; "
            "fix the pattern file or retrain the gates"
        )
    arr = np.array(arr, dtype=np.float32)  # copy; values beyond float32 become inf
    bad = _first_non_finite(arr)
    if bad is not None:
        layer, head = bad
        raise PatternError(
            f"{what} contain a non-finite value ({arr[layer, head]}) at layer {layer}, "
            f"KV head {head}; retrain the gates or fix the pattern file"
        )
    return arr


def _as_mask(mask: Any) -> np.ndarray:
    arr = _as_2d(mask, "mask")
    if arr.dtype != np.bool_:
        raise PatternError(
            f"mask must be a boolean [num_layers, num_kv_heads] array, got dtype "
            f"{arr.dtype}; build it with binarize()"
        )
    return arr


def _check_positive_int(value: Any, name: str) -> None:
    if value is not None and (not _is_int(value) or value <= 0):
        raise PatternError(f"{name} must be a positive integer or None, got {value!r}")


def _check_sparsity(value: Any, name: str = "sparsity") -> float:
    if not _is_real(value) or not (0.0 <= value <= 1.0):  # no float(): 10**400 overflows
        raise PatternError(
            f"{name} must be a number in [0, 1] (the fraction of STREAMING heads, "
            f"e.g. 0.5), got {value!r}"
        )
    return float(value)


# --------------------------------------------------------------------------
# the pattern object
# --------------------------------------------------------------------------


@dataclass(eq=False)
class HeadPattern:
    """Trained DuoAttention gates plus the metadata needed to deploy them.

    Parameters
    ----------
    gates : np.ndarray, float32, shape [num_layers, num_kv_heads]
        Trained gate values ``alpha``; higher means "needs the full KV cache".
    sink_size, recent_size : int or None
        Number of attention-sink and recent tokens a streaming head keeps, as
        used in training (and the deployment default).  None if unknown.
    model_name : str or None
        Model the gates were trained for (informational).
    model_fingerprint : str or None
        :func:`model_fingerprint` of that model's config, used to refuse a
        pattern trained for a different model with the same shape.
    sparsity : float or None
        Default deployment sparsity, the fraction of STREAMING heads.
    provenance : dict
        Free-form training record (data, steps, seed, losses, ...).
    source : str or None
        Path the pattern was loaded from, for messages.
    """

    gates: np.ndarray
    sink_size: int | None = None
    recent_size: int | None = None
    model_name: str | None = None
    model_fingerprint: str | None = None
    sparsity: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        self.gates = _as_gates(self.gates)
        _check_positive_int(self.sink_size, "sink_size")
        _check_positive_int(self.recent_size, "recent_size")
        if self.sink_size is not None:
            self.sink_size = int(self.sink_size)
        if self.recent_size is not None:
            self.recent_size = int(self.recent_size)
        if self.sparsity is not None:
            self.sparsity = _check_sparsity(self.sparsity, "pattern sparsity")
        if self.provenance is None:
            self.provenance = {}
        if not isinstance(self.provenance, dict):
            raise PatternError(
                f"provenance must be a dict, got {type(self.provenance).__name__}"
            )
        for name in ("model_name", "model_fingerprint", "source"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if isinstance(value, os.PathLike):
                    setattr(self, name, os.fspath(value))
                else:
                    raise PatternError(
                        f"{name} must be a string or None, got {type(value).__name__}"
                    )

    @property
    def num_layers(self) -> int:
        """Number of decoder layers (rows of ``gates``)."""
        return int(self.gates.shape[0])

    @property
    def num_kv_heads(self) -> int:
        """Number of KV heads per layer (columns of ``gates``)."""
        return int(self.gates.shape[1])

    def binarize(
        self,
        sparsity: float | None = None,
        threshold: float | None = None,
        min_retrieval_per_layer: int = 0,
    ) -> np.ndarray:
        """Retrieval mask of this pattern; see :func:`binarize`.

        Falls back to the pattern's own ``sparsity`` when neither ``sparsity``
        nor ``threshold`` is given.

        Returns
        -------
        np.ndarray, bool, shape [num_layers, num_kv_heads]
            True marks a retrieval (full KV cache) head.
        """
        if sparsity is None and threshold is None:
            if self.sparsity is None:
                raise PatternError(
                    "the pattern has no default sparsity; pass sparsity=... (fraction "
                    "of streaming heads, e.g. 0.5) or threshold=..."
                )
            sparsity = self.sparsity
        return binarize(
            self.gates,
            sparsity=sparsity,
            threshold=threshold,
            min_retrieval_per_layer=min_retrieval_per_layer,
        )

    def describe(self) -> str:
        """One-line summary for logs."""
        return (
            f"HeadPattern({self.num_layers}x{self.num_kv_heads}, "
            f"model={self.model_name!r}, sink={self.sink_size}, "
            f"recent={self.recent_size}, sparsity={self.sparsity}, "
            f"source={self.source!r})"
        )


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PatternError(f"cannot read pattern file {path}: {exc}") from None
    except UnicodeDecodeError:
        raise PatternError(
            f"pattern file {path} is not UTF-8 text; point to a {PATTERN_FILENAME} or "
            f"{ORIGINAL_GATES_FILENAME} file"
        ) from None


def _read_json(path: Path) -> Any:
    text = _read_text(path)
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


def _parse_tsv(path: Path) -> np.ndarray:
    """Parse ``full_attention_heads.tsv`` with line numbers in every error."""
    rows: list[list[float]] = []
    width: int | None = None
    first_line = 0
    for lineno, raw in enumerate(_read_text(path).splitlines(), start=1):
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
            f"{config_path}); copy the config.json of the same training run there"
        )
    gates = _parse_tsv(tsv_path)
    # Same as the reference loader: trained gates undershoot 0 slightly.
    gates = np.clip(gates, 0.0, 1.0).astype(np.float32)
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise PatternError(
            f"{config_path} must hold a JSON object with the training arguments"
        )
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
    )


def _load_ours(path: Path) -> HeadPattern:
    data = _read_json(path)
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


def load_pattern(path: str | os.PathLike[str]) -> HeadPattern:
    """Load a head pattern in either supported format.

    Parameters
    ----------
    path : str or PathLike
        A directory (``duo_pattern.json`` is preferred, else the original
        ``full_attention_heads.tsv`` + ``config.json`` pair) or a direct path to
        one of those files.

    Returns
    -------
    HeadPattern
        Original-format gates are clipped to [0, 1] like the reference loader;
        our format is returned exactly as saved.
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
        ours = p / PATTERN_FILENAME
        tsv = p / ORIGINAL_GATES_FILENAME
        if ours.is_file():
            if tsv.is_file():
                logger.debug("%s has both formats; using %s", p, PATTERN_FILENAME)
            pattern = _load_ours(ours)
        elif tsv.is_file():
            pattern = _load_original(tsv, p / ORIGINAL_CONFIG_FILENAME)
        else:
            raise PatternError(
                f"no head pattern in directory {p}: looked for {PATTERN_FILENAME} or "
                f"{ORIGINAL_GATES_FILENAME} + {ORIGINAL_CONFIG_FILENAME}; {_HOW_TO_GET_PATTERN}"
            )
    elif is_file:
        if p.suffix.lower() == ".tsv":
            pattern = _load_original(p, p.parent / ORIGINAL_CONFIG_FILENAME)
        elif p.name == ORIGINAL_CONFIG_FILENAME and (p.parent / ORIGINAL_GATES_FILENAME).is_file():
            pattern = _load_original(p.parent / ORIGINAL_GATES_FILENAME, p)
        elif p.suffix.lower() == ".json":
            pattern = _load_ours(p)
        else:
            raise PatternError(
                f"don't know how to read {p}: pass a directory, a {PATTERN_FILENAME} or "
                f"a {ORIGINAL_GATES_FILENAME}"
            )
    else:
        raise PatternError(
            f"head pattern path {p} does not exist (expected a directory holding "
            f"{PATTERN_FILENAME} or {ORIGINAL_GATES_FILENAME} + {ORIGINAL_CONFIG_FILENAME}, "
            f"or a path to one of those files); {_HOW_TO_GET_PATTERN}"
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


# --------------------------------------------------------------------------
# binarisation
# --------------------------------------------------------------------------


def _rank_order(gates: np.ndarray) -> np.ndarray:
    """Flat indices sorted by gate descending, ties by lower flat index."""
    flat = gates.reshape(-1)
    # stable sort of the negated gates: equal gates keep index order
    return np.argsort(-flat, kind="stable")


def binarize(
    gates: np.ndarray,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    min_retrieval_per_layer: int = 0,
) -> np.ndarray:
    """Decide per (layer, KV head) whether it is a retrieval head.

    Deterministic replacement of the reference ``sparsify_attention_heads``
    (which adds random noise and takes a quantile, so the head count drifts).

    Parameters
    ----------
    gates : np.ndarray, shape [num_layers, num_kv_heads]
        Trained gate values; must be finite.
    sparsity : float, optional
        Fraction of STREAMING heads in [0, 1].  Exactly
        ``floor(sparsity * N + 0.5)`` of the ``N`` heads become streaming heads;
        the rest, those with the highest gates, are retrieval heads (ties go
        to the lower flat index ``layer * num_kv_heads + head``).
    threshold : float, optional
        Heads with ``gate >= threshold`` are retrieval heads.
    min_retrieval_per_layer : int
        Afterwards every layer with fewer retrieval heads gets its
        highest-gate streaming heads promoted until it has this many.  This
        can push the total retrieval count above the ``sparsity`` budget.

    Returns
    -------
    np.ndarray, bool, shape [num_layers, num_kv_heads]
        True marks a retrieval (full KV cache) head.
    """
    if (sparsity is None) == (threshold is None):
        raise PatternError(
            "pass exactly one of sparsity= (fraction of streaming heads) or "
            "threshold= (minimum gate of a retrieval head)"
        )
    g = _as_gates(gates)
    num_layers, num_heads = g.shape
    if not _is_int(min_retrieval_per_layer) or not 0 <= min_retrieval_per_layer <= num_heads:
        raise PatternError(
            f"min_retrieval_per_layer must be an integer in [0, {num_heads}] (the KV "
            f"heads per layer), got {min_retrieval_per_layer!r}"
        )
    order = _rank_order(g)
    total = g.size
    if sparsity is not None:
        s = _check_sparsity(sparsity)
        num_streaming = min(total, int(math.floor(s * total + 0.5)))
        flat = np.zeros(total, dtype=bool)
        flat[order[: total - num_streaming]] = True
        mask = flat.reshape(num_layers, num_heads)
    else:
        if not _is_real(threshold) or not math.isfinite(float(threshold)):
            raise PatternError(f"threshold must be a finite number, got {threshold!r}")
        # compare in float64: exact for every float32 gate and any threshold
        mask = g.astype(np.float64) >= float(threshold)

    k = int(min_retrieval_per_layer)
    if k > 0:
        counts = mask.sum(axis=1)
        for layer in np.flatnonzero(counts < k):
            row_order = np.argsort(-g[layer], kind="stable")
            missing = k - int(counts[layer])
            for head in row_order:
                if missing == 0:
                    break
                if not mask[layer, head]:
                    mask[layer, head] = True
                    missing -= 1
    return mask


# --------------------------------------------------------------------------
# head layout mapping
# --------------------------------------------------------------------------


def kv_to_query_heads(mask: np.ndarray, num_query_heads: int) -> np.ndarray:
    """Expand a KV-head mask to query heads (grouped-query attention).

    Query head ``q`` reads KV head ``q // (num_query_heads // num_kv_heads)``
    (the vLLM / Hugging Face convention), so each KV column is repeated for
    its group of consecutive query heads.

    Parameters
    ----------
    mask : np.ndarray, shape [num_layers, num_kv_heads]
    num_query_heads : int

    Returns
    -------
    np.ndarray, same dtype, shape [num_layers, num_query_heads]
    """
    m = _as_2d(mask, "mask")
    num_kv = m.shape[1]
    if not _is_int(num_query_heads) or num_query_heads <= 0 or num_query_heads % num_kv:
        raise PatternError(
            f"num_query_heads ({num_query_heads!r}) must be a positive multiple of the "
            f"pattern's {num_kv} KV heads; the pattern is probably for another model"
        )
    return np.repeat(m, int(num_query_heads) // num_kv, axis=1)


def shard_for_tensor_parallel(mask: np.ndarray, tp_size: int, rank: int) -> np.ndarray:
    """Columns of ``mask`` for the KV heads that tensor-parallel ``rank`` holds.

    Follows vLLM's ``QKVParallelLinear``: with ``num_kv_heads >= tp_size`` the
    heads are split into equal contiguous blocks; with fewer KV heads than
    ranks each KV head is replicated on ``tp_size // num_kv_heads``
    consecutive ranks.

    Parameters
    ----------
    mask : np.ndarray, shape [num_layers, num_kv_heads]
    tp_size : int
    rank : int, 0 <= rank < tp_size

    Returns
    -------
    np.ndarray, shape [num_layers, max(num_kv_heads // tp_size, 1)]
    """
    m = _as_2d(mask, "mask")
    num_kv = m.shape[1]
    if not _is_int(tp_size) or tp_size <= 0:
        raise PatternError(f"tensor_parallel_size must be a positive integer, got {tp_size!r}")
    if not _is_int(rank) or not 0 <= rank < tp_size:
        raise PatternError(
            f"tensor-parallel rank must be an integer in [0, {tp_size}), got {rank!r}"
        )
    tp_size, rank = int(tp_size), int(rank)
    if num_kv >= tp_size:
        if num_kv % tp_size:
            raise PatternError(
                f"{num_kv} KV heads cannot be split over tensor_parallel_size={tp_size}; "
                "use a tensor-parallel size that divides the number of KV heads"
            )
        per_rank = num_kv // tp_size
        return m[:, rank * per_rank : (rank + 1) * per_rank].copy()
    if tp_size % num_kv:
        raise PatternError(
            f"tensor_parallel_size={tp_size} is larger than the {num_kv} KV heads but "
            "not a multiple of it; use a tensor-parallel size that is a multiple of "
            "the number of KV heads"
        )
    head = rank // (tp_size // num_kv)
    return m[:, head : head + 1].copy()


# --------------------------------------------------------------------------
# model identity
# --------------------------------------------------------------------------


def _cfg_get(config: Any, key: str) -> Any:
    try:
        if isinstance(config, Mapping):
            return config.get(key)
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - odd config objects must never crash start-up
        return None


def _norm_int(value: Any) -> int | None:
    if _is_int(value):
        return int(value)
    if _is_real(value) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    return None


def _norm_float(value: Any) -> float | None:
    if _is_real(value) and math.isfinite(float(value)):
        return float(value)
    return None


def _rope_theta(config: Any) -> float | None:
    theta = _norm_float(_cfg_get(config, "rope_theta"))
    if theta is not None:
        return theta
    for key in ("rope_parameters", "rope_scaling"):
        params = _cfg_get(config, key)
        if isinstance(params, Mapping):
            theta = _norm_float(params.get("rope_theta"))
            if theta is not None:
                return theta
            # per-layer-type parameters, e.g. {"full_attention": {...}, ...}
            for sub_key in sorted(str(k) for k in params):
                sub = params.get(sub_key)
                if isinstance(sub, Mapping):
                    theta = _norm_float(sub.get("rope_theta"))
                    if theta is not None:
                        return theta
    return None


def model_fingerprint(config: Any) -> str:
    """Short hash of the fields that define a model's attention layout.

    Two models with the same fingerprint have the same architecture, layer
    and head counts, head size, vocabulary, RoPE base and context length, so a
    pattern trained on one is at least shaped for the other.  Missing fields
    count as None; this never raises.

    Parameters
    ----------
    config : Mapping or object
        A ``config.json`` dict or a Hugging Face ``PretrainedConfig``.

    Returns
    -------
    str
        First 16 hex characters of a SHA-256 over canonical JSON.
    """
    archs = _cfg_get(config, "architectures")
    if isinstance(archs, str):
        archs = [archs]
    try:
        archs = sorted(str(a) for a in archs) if archs is not None else None
    except TypeError:
        archs = None
    num_heads = _norm_int(_cfg_get(config, "num_attention_heads"))
    num_kv = _norm_int(_cfg_get(config, "num_key_value_heads"))
    if num_kv is None:
        num_kv = num_heads
    hidden = _norm_int(_cfg_get(config, "hidden_size"))
    head_dim = _norm_int(_cfg_get(config, "head_dim"))
    if head_dim is None and hidden is not None and num_heads:
        head_dim = hidden // num_heads
    fields = {
        "architectures": archs,
        "num_hidden_layers": _norm_int(_cfg_get(config, "num_hidden_layers")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv,
        "hidden_size": hidden,
        "head_dim": head_dim,
        "vocab_size": _norm_int(_cfg_get(config, "vocab_size")),
        "rope_theta": _rope_theta(config),
        "max_position_embeddings": _norm_int(_cfg_get(config, "max_position_embeddings")),
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _short_name(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def validate_for_model(
    pattern: HeadPattern,
    *,
    num_layers: int,
    num_kv_heads: int,
    fingerprint: str | None = None,
    model_name: str | None = None,
) -> None:
    """Refuse a pattern that was trained for a different model.

    Parameters
    ----------
    pattern : HeadPattern
    num_layers, num_kv_heads : int
        The served model's decoder layers and (total, un-sharded) KV heads.
    fingerprint : str, optional
        :func:`model_fingerprint` of the served model; compared when the
        pattern has one too.
    model_name : str, optional
        Served model name, for messages only.
    """
    served = model_name or "the served model"
    trained_for = pattern.model_name or "an unknown model"
    where = f" ({pattern.source})" if pattern.source else ""
    if (pattern.num_layers, pattern.num_kv_heads) != (num_layers, num_kv_heads):
        raise PatternError(
            f"head pattern{where} has shape {pattern.num_layers} layers x "
            f"{pattern.num_kv_heads} KV heads but {served} has {num_layers} layers x "
            f"{num_kv_heads} KV heads: the pattern is for another model "
            f"({trained_for}); {_HOW_TO_GET_PATTERN.replace('MODEL', model_name or 'MODEL')}"
        )
    if (
        fingerprint is not None
        and pattern.model_fingerprint is not None
        and fingerprint != pattern.model_fingerprint
    ):
        raise PatternError(
            f"head pattern{where} was trained for {trained_for} (fingerprint "
            f"{pattern.model_fingerprint}) but {served} has fingerprint {fingerprint}: "
            "same shape, different model; "
            f"{_HOW_TO_GET_PATTERN.replace('MODEL', model_name or 'MODEL')}"
        )
    if (
        model_name
        and pattern.model_name
        and _short_name(model_name) != _short_name(pattern.model_name)
    ):
        logger.warning(
            "head pattern%s was trained for %s, serving %s (shapes match)",
            where,
            pattern.model_name,
            model_name,
        )


def retrieval_stats(mask: np.ndarray) -> dict[str, Any]:
    """Summary of a retrieval mask for the start-up log line.

    Parameters
    ----------
    mask : np.ndarray, bool, shape [num_layers, num_kv_heads]

    Returns
    -------
    dict
        ``per_layer`` (list of retrieval counts per layer), ``min_per_layer``,
        ``mean_per_layer``, ``max_per_layer``, ``num_retrieval``,
        ``num_heads`` and ``retrieval_fraction``.
    """
    m = _as_mask(mask)
    per_layer = m.sum(axis=1).astype(int)
    num_retrieval = int(per_layer.sum())
    return {
        "num_layers": int(m.shape[0]),
        "num_kv_heads": int(m.shape[1]),
        "per_layer": [int(c) for c in per_layer],
        "min_per_layer": int(per_layer.min()),
        "mean_per_layer": float(per_layer.mean()),
        "max_per_layer": int(per_layer.max()),
        "num_retrieval": num_retrieval,
        "num_heads": int(m.size),
        "retrieval_fraction": num_retrieval / m.size,
    }
