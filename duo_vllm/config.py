"""DUO options, as users pass them: ``--additional-config '{"duo": {...}}'``.

vLLM has no official channel for a custom backend's options; ``additional_config`` is part of the
config hash, so different DUO settings never share compiled artefacts or cached state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any


DEFAULT_SINK = 64
DEFAULT_RECENT = 256
DEFAULT_SPARSITY = 0.5
# The CUDA backends DUO's retrieval heads can run through (option "kernel").
KERNELS = ("auto", "flash_attn", "flashinfer")

_EXAMPLE = '--additional-config \'{"duo": {"pattern": "patterns/SmolLM2-135M-Instruct", "sparsity": 0.5}}\''


class DuoConfigError(ValueError):
    """A DUO option (``--additional-config '{"duo": {...}}'``) that cannot be served as given, or a
    combination of options and vLLM settings DUO does not serve. One line: what is wrong, how to fix
    it. Pattern files and their values raise :class:`duo_vllm.pattern.PatternError` instead."""


@dataclass(frozen=True)
class DuoConfig:
    """Validated DUO options.

    pattern : path to a pattern folder or file (default: the shipped pattern for the model)
    sparsity : fraction of KV heads that stream (default: the pattern's own, else 0.5)
    retrieval_ratio : 1 - sparsity (give one of the two, or ``threshold``)
    threshold : gates >= threshold become retrieval heads instead of a global quantile
    sink, recent : attention-sink tokens and recent window of streaming heads (default: 64, 256,
        the paper's deployment setting; patterns record the window they were trained with, and
        the start-up line names it when it differs)
    min_retrieval_per_layer : keep at least this many retrieval KV heads in every layer
    reorder_heads : put each layer's retrieval heads first by reordering its attention weights
        at load (``duo_vllm.head_order``), so kernels read head slices instead of gathering
        heads at every step; false keeps the checkpoint's order (same results)
    overlap_streaming : on CUDA, run a layer's streaming heads on a second stream beside the
        retrieval heads' FlashAttention call instead of after it (same results; CPU runs them in
        turn either way). Off by default: on an H200 at batch-1 decode it saved 1-2% per token
        for Llama-2-7B at 25% retrieval (64K) and cost 1-3% for Llama-3-8B at 50% (128K), where
        the streaming kernels slow FA3 by more than they hide (docs/backend.md)
    kernel : on CUDA, vLLM's backend the retrieval heads run through: "flash_attn" (FLASH_ATTN),
        "flashinfer" (FLASHINFER) or "auto" (default): vLLM's own first choice for the card,
        FLASHINFER on Blackwell (compute capability 10.x), FLASH_ATTN elsewhere. Logged at
        start-up with the kernels it runs (``duo_vllm.backends.capabilities``); ignored on CPU
    """

    pattern: str | None = None
    sparsity: float | None = None
    retrieval_ratio: float | None = None
    threshold: float | None = None
    sink: int = DEFAULT_SINK
    recent: int = DEFAULT_RECENT
    min_retrieval_per_layer: int = 0
    reorder_heads: bool = True
    overlap_streaming: bool = False
    kernel: str = "auto"

    def __post_init__(self) -> None:
        chosen = [n for n in ("sparsity", "retrieval_ratio", "threshold") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise DuoConfigError(f"DUO options {chosen} are exclusive: give only one of them.")
        for name in ("sparsity", "retrieval_ratio"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0.0 <= float(value) <= 1.0):
                raise DuoConfigError(f'DUO option "{name}" must be a number in [0, 1], got {value!r}.')
        if self.threshold is not None and not _is_number(self.threshold):
            raise DuoConfigError(f'DUO option "threshold" must be a finite number, got {self.threshold!r}.')
        for name in ("sink", "recent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DuoConfigError(
                    f'DUO option "{name}" must be a positive integer number of tokens, got {value!r} '
                    f"(default: sink {DEFAULT_SINK}, recent {DEFAULT_RECENT}, the paper's deployment setting)."
                )
        m = self.min_retrieval_per_layer
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise DuoConfigError(f'DUO option "min_retrieval_per_layer" must be an integer >= 0, got {m!r}.')
        for name in ("reorder_heads", "overlap_streaming"):
            if not isinstance(getattr(self, name), bool):
                raise DuoConfigError(f'DUO option "{name}" must be true or false, got {getattr(self, name)!r}.')
        if self.kernel not in KERNELS:
            raise DuoConfigError(f'DUO option "kernel" must be one of {list(KERNELS)}, got {self.kernel!r}.')
        if self.pattern is not None and not isinstance(self.pattern, str):
            raise DuoConfigError(f'DUO option "pattern" must be a path string, got {self.pattern!r}.')

    def is_set(self, name: str) -> bool:
        """Whether the user gave option ``name`` rather than taking its default, so the start-up
        line can say where a served value came from. Options read by
        :meth:`from_additional_config` know the keys given; a config built in Python counts a
        value other than the default as given."""
        given = self.__dict__.get("_given")
        if given is not None:
            return name in given
        default = next(f.default for f in fields(self) if f.name == name)
        return getattr(self, name) != default

    @property
    def effective_sparsity(self) -> float | None:
        if self.retrieval_ratio is not None:
            return 1.0 - float(self.retrieval_ratio)
        return None if self.sparsity is None else float(self.sparsity)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "DuoConfig":
        """Read ``additional_config["duo"]``; unknown keys are an error, not silently ignored."""
        raw = (additional_config or {}).get("duo", {}) if isinstance(additional_config, dict) else {}
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # also an integer over 4300 digits, nesting too deep
                raise DuoConfigError(f'"duo" options are not valid JSON ({exc}); example: {_EXAMPLE}') from None
        if not isinstance(raw, dict):
            raise DuoConfigError(f'"duo" options must be a JSON object, got {raw!r}; example: {_EXAMPLE}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known, key=str)  # key: Python callers may pass keys of any type
        if unknown:
            raise DuoConfigError(f"Unknown DUO option(s) {unknown}; valid options: {sorted(known)}.")
        config = cls(**raw)
        object.__setattr__(config, "_given", frozenset(raw))  # not a field: no option, no equality
        return config


def _is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range, e.g. 10**400
        return False
