"""Model identity: a short hash of the config fields that fix a model's attention layout, so a
pattern trained for one model is refused on another of the same shape. Shared by the plugin (at
start-up) and gate training (written into each pattern). Never raises on odd configs.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping

from duo_vllm.pattern import _is_int, _is_real

__all__ = ["model_fingerprint"]


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
