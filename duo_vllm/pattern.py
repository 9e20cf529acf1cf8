"""Per-head DuoAttention patterns: the gates, the retrieval mask they give, and its layout.

DuoAttention trains one gate value ``alpha`` per (layer, KV head). At deployment a head with a
high gate keeps the full KV cache ("retrieval" head) and a head with a low gate only keeps the
attention sinks plus a recent window ("streaming" head). This module turns gates into that mask
and lays it out, testable without vLLM or a GPU:

* the pattern object (:class:`HeadPattern`) and its checks;
* gates to a retrieval mask, deterministically (the reference adds random noise before taking a
  quantile, so its head count and heads vary between runs);
* the KV-head mask onto query heads (GQA) and onto the KV heads a tensor-parallel rank owns;
* refusing a pattern trained for another model.

Files live in :mod:`duo_vllm.pattern_io`, model identity in :mod:`duo_vllm.fingerprint`. Numpy and
the standard library only.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "PatternError",
    "HeadPattern",
    "binarize",
    "kv_to_query_heads",
    "shard_for_tensor_parallel",
    "validate_for_model",
    "retrieval_stats",
]

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
    source_format, content_hash : str or None
        The file's format (``duo-vllm-json``, ``duoattention-tsv``, ``prulong-masks-tsv``) and the
        first 12 hex digits of its sha256, set by the loader so logs say exactly which map serves.
    """

    gates: np.ndarray
    sink_size: int | None = None
    recent_size: int | None = None
    model_name: str | None = None
    model_fingerprint: str | None = None
    sparsity: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    source_format: str | None = None
    content_hash: str | None = None

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
        for name in ("model_name", "model_fingerprint", "source", "source_format", "content_hash"):
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
            f"source={self.source!r}, format={self.source_format}, sha256={self.content_hash})"
        )


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
# the served model
# --------------------------------------------------------------------------


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
