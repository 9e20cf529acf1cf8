"""The attention settings an evaluation compares, all at the same KV budget except stock:

  stock      vLLM's own attention (full KV cache on every head)
  duo        DUO with the given options (the shipped pattern of the model by default)
  streaming  every head streaming: sink + recent tokens only (StreamingLLM)
  inverse    DUO with the pattern turned upside down: the heads it ranks lowest keep the full KV
  random     DUO with random gates: as many retrieval heads, chosen at random (seeded)

``inverse`` and ``random`` keep as many retrieval heads as ``duo`` serves, so the three differ only
in which heads they are; their patterns are written into the output folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duo_vllm.config import DuoConfig
from duo_vllm.pattern import HeadPattern
from duo_vllm.pattern_io import save_pattern

logger = logging.getLogger(__name__)

BACKENDS = ("stock", "duo", "streaming", "inverse", "random")


@dataclass(frozen=True)
class Backend:
    name: str
    duo: dict | None = None  # DUO options; None: stock vLLM attention
    note: str = ""
    retrieval_heads: int | None = field(default=None, compare=False)
    total_heads: int | None = field(default=None, compare=False)

    def engine_kwargs(self) -> dict:
        if self.duo is None:
            return {}
        return {"attention_backend": "DUO", "additional_config": {"duo": self.duo}}


def _model_shape(model: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    return text, layers, kv_heads


def base_runtime(model: str, duo_options: dict):
    """The runtime vLLM would build for ``duo_options`` on ``model`` (pattern, mask), without an
    engine: the same checks (pattern for this model, options in range) fail here, before one starts."""
    from duo_vllm.runtime import build_runtime

    hf_config, layers, kv_heads = _model_shape(model)
    config = DuoConfig(**duo_options)
    return build_runtime(config, hf_config=hf_config, model_name=model, num_layers=layers, total_kv_heads=kv_heads)


def _derived(runtime, gates: np.ndarray, tag: str) -> HeadPattern:
    base = runtime.pattern
    retrieval = int(runtime.retrieval_mask.sum())
    total = runtime.retrieval_mask.size
    return HeadPattern(gates.astype(np.float32), sink_size=base.sink_size, recent_size=base.recent_size,
                       model_name=base.model_name, model_fingerprint=base.model_fingerprint,
                       sparsity=(total - retrieval) / total,
                       provenance={"derived_from": base.source or base.model_name, "derivation": tag})


def resolve(names: list[str], model: str, duo_options: dict, out_dir: Path, seed: int) -> list[Backend]:
    """The backends named, in order; patterns of ``inverse`` / ``random`` written under ``out_dir``."""
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; backends: {', '.join(BACKENDS)}")
    wants_duo = any(n != "stock" for n in names)
    runtime = base_runtime(model, duo_options) if wants_duo else None
    out: list[Backend] = []
    if runtime is not None:
        total = runtime.retrieval_mask.size
        retrieval = int(runtime.retrieval_mask.sum())
        shared = {k: v for k, v in duo_options.items() if k in ("sink", "recent", "reorder_heads", "overlap_streaming", "kernel")}
    for name in names:
        if name == "stock":
            out.append(Backend("stock", None, "vLLM's own attention, full KV on every head"))
            continue
        if name == "duo":
            out.append(Backend("duo", dict(duo_options), f"DUO, {retrieval}/{total} retrieval heads",
                               retrieval, total))
            continue
        if name == "streaming":
            opts = {**shared, "pattern": runtime.pattern.source, "sparsity": 1.0} if runtime.pattern.source \
                else {**shared, "sparsity": 1.0}
            out.append(Backend("streaming", opts, "every head streaming (sink + recent)", 0, total))
            continue
        gates = runtime.pattern.gates
        if name == "inverse":
            pattern = _derived(runtime, -gates, "gates negated: the lowest-ranked heads retrieve")
        else:
            rng = np.random.default_rng(seed)
            pattern = _derived(runtime, rng.random(gates.shape), f"uniform random gates, seed {seed}")
        folder = out_dir / "patterns" / name
        save_pattern(pattern, folder, overwrite=True)
        opts = {**shared, "pattern": str(folder.resolve()), "sparsity": pattern.sparsity}
        out.append(Backend(name, opts, f"DUO with {pattern.provenance['derivation']}, {retrieval}/{total} "
                                       "retrieval heads", retrieval, total))
    return out
