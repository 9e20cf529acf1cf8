"""The DUO state of one engine: options, the chosen pattern and its retrieval mask.

Built once per process from the ``VllmConfig`` (the first attention layer asks for it), so a bad
option or a pattern for another model stops start-up with one message before any weights load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from duo_vllm.config import DEFAULT_SPARSITY, DuoConfig, DuoConfigError
from duo_vllm.fingerprint import model_fingerprint
from duo_vllm.pattern import (
    HeadPattern,
    PatternError,
    retrieval_stats,
    shard_for_tensor_parallel,
    validate_for_model,
)
from duo_vllm.pattern_formats import FORMAT_PRULONG_MASKS, check_mask_selection
from duo_vllm.pattern_io import find_pattern_file, load_pattern
from duo_vllm.shipped_patterns import find_shipped_pattern

# Under "vllm." so that vLLM's own log handler (format, level, process prefix) shows it.
logger = logging.getLogger("vllm.duo_vllm")


@dataclass(frozen=True)
class HeadSlots:
    """KV head slots per layer in the two cache groups (identical on every TP rank)."""

    retrieval: np.ndarray  # int [num_layers]
    streaming: np.ndarray  # int [num_layers]
    local_kv_heads: int

    @property
    def padding(self) -> int:
        """Slots beyond the local KV heads, summed over layers: the TP padding cost."""
        return int((self.retrieval + self.streaming - self.local_kv_heads).sum())


@dataclass(frozen=True)
class DuoRuntime:
    config: DuoConfig
    pattern: HeadPattern
    sparsity: float | None  # None when a threshold chose the heads
    retrieval_mask: np.ndarray  # bool [num_layers, total_kv_heads], True = retrieval
    tp_size: int = 1
    tp_rank: int = 0
    pattern_origin: str | None = None  # "the pattern option", "the model folder", "the shipped patterns"
    # KV-layout decisions fixed at their first use per engine configuration (the streaming block
    # size: duo_vllm.kv_cache.spec.planned_streaming_block_size); the runtime owns them, so the
    # layer specs and the KV report read one value.
    kv_layout: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def sink(self) -> int:
        return self.config.sink

    @property
    def recent(self) -> int:
        return self.config.recent

    def local_retrieval_kv_heads(self, layer_index: int) -> np.ndarray:
        """bool [local_kv_heads] for this tensor-parallel rank."""
        shard = shard_for_tensor_parallel(self.retrieval_mask, self.tp_size, self.tp_rank)
        return shard[layer_index]

    @cached_property
    def head_slots(self) -> "HeadSlots":
        """Per-layer retrieval / streaming KV head slots of every rank's cache spec.

        vLLM requires each layer's KV-cache spec to be identical on all tensor-parallel ranks,
        but a pattern can give ranks different retrieval counts in one layer; each layer's
        spec therefore takes the largest count over ranks (a rank with fewer leaves slots
        unused). With one rank there is no padding.
        """
        shards = [shard_for_tensor_parallel(self.retrieval_mask, self.tp_size, rank)
                  for rank in range(self.tp_size)]
        retrieval = np.max([shard.sum(axis=1) for shard in shards], axis=0).astype(int)
        streaming = np.max([(~shard).sum(axis=1) for shard in shards], axis=0).astype(int)
        local_heads = shards[0].shape[1]
        return HeadSlots(retrieval, streaming, local_heads)

    @cached_property
    def plan_digest(self) -> str:
        """sha256 of what every process must agree on: the retrieval mask and the window. Two
        processes with the same digest serve the same heads the same way, whatever file each
        read it from."""
        mask = np.ascontiguousarray(self.retrieval_mask, dtype=bool)
        head = json.dumps([list(mask.shape), self.sink, self.recent]).encode()
        return hashlib.sha256(head + mask.tobytes()).hexdigest()[:16]

    def kv_saving(self, context_len: int) -> float:
        """Fraction of KV bytes saved versus full attention for one sequence of ``context_len``."""
        if context_len <= 0:
            return 0.0
        retrieval = self.retrieval_mask.mean()
        streaming_tokens = min(context_len, self.sink + self.recent)
        kept = retrieval + (1.0 - retrieval) * streaming_tokens / context_len
        return 1.0 - kept

    def summary(self, context_len: int) -> str:
        stats = retrieval_stats(self.retrieval_mask)
        if self.sparsity is not None:
            choice = f"sparsity {self.sparsity:.2f} ({self._sparsity_origin()})"
        else:
            choice = f"threshold {self.config.threshold}"
        return (
            f"DUO attention: pattern {self.pattern.source or self.pattern.model_name} "
            f"({self._pattern_identity()}{choice}); "
            f"retrieval KV heads per layer min/mean/max {stats['min_per_layer']}/"
            f"{stats['mean_per_layer']:.2f}/{stats['max_per_layer']} of {stats['num_kv_heads']} "
            f"({stats['retrieval_fraction']:.1%} of all heads); sink {self.sink}, recent {self.recent} "
            f"({self._window_origin()}{self._trained_window_note()}); "
            f"KV saving this pattern implies at {context_len} tokens: {self.kv_saving(context_len):.1%}"
        )

    def _pattern_identity(self) -> str:
        """Which map exactly, and how it was found: format, file digest, origin."""
        parts = [self.pattern.source_format, self.pattern.content_hash and f"sha256 {self.pattern.content_hash}",
                 self.pattern_origin and f"from {self.pattern_origin}"]
        return "".join(f"{part}, " for part in parts if part)

    def _sparsity_origin(self) -> str:
        if self.config.effective_sparsity is not None:
            return "option"
        if self.pattern.sparsity is None:
            return "default"
        return "the mask's own split" if self.pattern.source_format == FORMAT_PRULONG_MASKS else "the pattern's own"

    def _window_origin(self) -> str:
        given = [name for name in ("sink", "recent") if self.config.is_set(name)]
        if len(given) == 2:
            return "from the options"
        if not given:
            return "the defaults"
        other = "recent" if given == ["sink"] else "sink"
        return f"{given[0]} from the options, {other} the default"

    def _trained_window_note(self) -> str:
        """Where the served sink/recent differ from what the pattern was trained with, or the file
        records none: said, not silently applied. The ``sink``/``recent`` options win (default: the
        paper's deployment setting, 64/256; the paper trained with 128/256)."""
        trained = (self.pattern.sink_size, self.pattern.recent_size)
        if trained == (None, None):
            if self.config.is_set("sink") and self.config.is_set("recent"):
                return ""
            what = Path(self.pattern.source).name if self.pattern.source else "the pattern"
            return (f"; {what} records no sink/recent: set the sink/recent options to the window it "
                    "was trained with")
        if None in trained or trained == (self.sink, self.recent):
            return ""
        return (f"; the pattern was trained with sink {trained[0]}, recent {trained[1]}: "
                "set the sink/recent options to serve those")


def _model_folder_pattern(model_name: str) -> HeadPattern | None:
    """A head map the user put beside the weights (the model path is a local folder): served with
    no option, before any shipped pattern. A broken one stops start-up: it was put there to be used."""
    try:
        folder = Path(model_name).expanduser()
        if not folder.is_dir():
            return None
    except (OSError, ValueError):
        return None
    found = find_pattern_file(folder)
    if found is None:
        return None
    logger.info("DUO pattern found in the model folder: %s (no pattern option given)", found)
    return load_pattern(found)


def build_runtime(
    duo_config: DuoConfig,
    *,
    hf_config,
    model_name: str,
    num_layers: int,
    total_kv_heads: int,
    tp_size: int = 1,
    tp_rank: int = 0,
    checkpoint_config=None,
) -> DuoRuntime:
    """The runtime of one served model.

    ``checkpoint_config`` is the model's config as its checkpoint states it, when the served
    ``hf_config`` differs from it (``--hf-overrides``, e.g. a longer ``max_position_embeddings``
    with RoPE scaling to extend the context): the weights, and so their heads' roles, are the
    same, so a pattern fingerprinted on the checkpoint's config still applies.
    """
    fingerprint = model_fingerprint(hf_config)
    fingerprints = [fingerprint]
    if checkpoint_config is not None and model_fingerprint(checkpoint_config) != fingerprint:
        fingerprints.append(model_fingerprint(checkpoint_config))
    if duo_config.pattern is not None:
        pattern, origin = load_pattern(duo_config.pattern), "the pattern option"
    elif (pattern := _model_folder_pattern(model_name)) is not None:
        origin = "the model folder"
    else:
        origin = "the shipped patterns"
        pattern = next(filter(None, (find_shipped_pattern(model_name, f) for f in fingerprints)), None)
        if pattern is None:
            raise PatternError(
                f"No DuoAttention pattern ships for model {model_name!r} (config fingerprint "
                f"{fingerprint}). Train one with `python -m gate_training --model {model_name} "
                f"--out patterns/NAME`, pass an existing one with "
                f"--additional-config '{{\"duo\": {{\"pattern\": \"/path/to/pattern\"}}}}', or put "
                f"one (duo_pattern.json, full_attention_heads.tsv + config.json, or masks.tsv) in the "
                f"model's own folder."
            )
    if pattern.model_fingerprint is not None and pattern.model_fingerprint in fingerprints[1:]:
        logger.info("DUO pattern %s matches %s's checkpoint config; serving it with the config "
                    "changed by --hf-overrides (same weights)", pattern.model_name, model_name)
        fingerprint = pattern.model_fingerprint
    validate_for_model(
        pattern, num_layers=num_layers, num_kv_heads=total_kv_heads,
        fingerprint=fingerprint, model_name=model_name,
    )
    if duo_config.threshold is not None:
        sparsity = None
        mask = pattern.binarize(threshold=duo_config.threshold,
                                min_retrieval_per_layer=duo_config.min_retrieval_per_layer)
    else:
        sparsity = duo_config.effective_sparsity
        check_mask_selection(pattern, sparsity)  # a hard 0/1 mask cannot rank its heads
        if sparsity is None:
            sparsity = pattern.sparsity if pattern.sparsity is not None else DEFAULT_SPARSITY
        mask = pattern.binarize(sparsity=sparsity,
                                min_retrieval_per_layer=duo_config.min_retrieval_per_layer)
    return DuoRuntime(duo_config, pattern, sparsity, mask, tp_size, tp_rank, origin)


_RUNTIMES: dict[str, DuoRuntime] = {}


def _checkpoint_config(model_config):
    """The model's (text) config before ``--hf-overrides``; None without overrides or when it
    cannot be read again (then only the served config is matched)."""
    if not model_config.hf_overrides:
        return None
    try:
        from vllm.transformers_utils.config import get_config

        config = get_config(model_config.hf_config_path or model_config.model, model_config.trust_remote_code,
                            getattr(model_config, "_hf_config_revision", None) or model_config.revision,
                            model_config.code_revision, model_config.config_format)
        return config.get_text_config()
    except Exception as exc:  # noqa: BLE001 - best effort: the served config is still matched
        logger.debug("cannot re-read %s's config without --hf-overrides: %s", model_config.model, exc)
        return None


def _runtime_key(vllm_config) -> str:
    """What a runtime is built from: the DUO options, the model, its overrides and the
    tensor-parallel place. (vLLM's own config hash is no stable API: 0.34 removed
    ``VllmConfig.compute_hash``.)"""
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    duo = (vllm_config.additional_config or {}).get("duo")
    return json.dumps([duo, model_config.model, model_config.revision, repr(model_config.hf_overrides),
                       parallel.tensor_parallel_size, parallel.pipeline_parallel_size, _tp_rank()],
                      sort_keys=True, default=repr)


def _tp_rank() -> int:
    """This process's tensor-parallel rank (0 before vLLM's distributed state exists: the
    front-end process and the one-rank case)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (AssertionError, RuntimeError):
        return 0


def check_pipeline_parallel(pipeline_parallel_size: int, platform: str | None = None) -> None:
    """Pipeline stages need nothing of DUO's own: vLLM builds only a stage's layers, each DUO layer
    reports its spec from the one global pattern by its global layer index, and vLLM's planner
    merges the stages' specs into DUO's two groups and gives each stage its own layers of them
    (``tests/duo_vllm/kv_cache/test_pipeline_stages.py`` runs that planner on per-stage specs).
    vLLM's CPU build cannot run pipeline parallelism at all (stock attention included: its later
    stages get no hidden states and fail at the first step), so it is refused there up front."""
    if pipeline_parallel_size <= 1:
        return
    if platform is None:
        from duo_vllm.vllm_support import platform_name

        platform = platform_name()
    if platform == "cpu":
        raise DuoConfigError(
            f"--pipeline-parallel-size {pipeline_parallel_size}: vLLM's CPU build cannot run pipeline "
            "parallelism (its later stages fail at the first step, with or without DUO); on CPU split "
            "the model with --tensor-parallel-size instead.")
    logger.info("DUO under pipeline parallelism (%d stages): each stage keeps the retrieval and streaming "
                "KV of its own layers only, planned from the whole model's pattern.", pipeline_parallel_size)


def runtime_from_vllm_config(vllm_config) -> DuoRuntime:
    """The process-wide runtime for ``vllm_config`` (built and logged once per config)."""
    key = _runtime_key(vllm_config)
    runtime = _RUNTIMES.get(key)
    if runtime is not None:
        return runtime
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    check_pipeline_parallel(parallel.pipeline_parallel_size)
    tp_rank = _tp_rank()
    hf_config = model_config.hf_text_config
    runtime = build_runtime(
        DuoConfig.from_additional_config(vllm_config.additional_config),
        hf_config=hf_config,
        model_name=model_config.model,
        num_layers=hf_config.num_hidden_layers,
        total_kv_heads=model_config.get_total_num_kv_heads(),
        tp_size=parallel.tensor_parallel_size,
        tp_rank=tp_rank,
        checkpoint_config=_checkpoint_config(model_config),
    )
    logger.info(runtime.summary(model_config.max_model_len))
    from vllm.platforms import current_platform

    if runtime.config.overlap_streaming:
        if not current_platform.is_cuda():
            logger.warning("DUO option overlap_streaming has no effect on %s: the streaming heads run after "
                           "the retrieval heads.", current_platform.device_type)
        elif parallel.use_ubatching:
            logger.warning("DUO option overlap_streaming is off under micro-batching (--enable-dbo or "
                           "--ubatch-size): the streaming heads run after the retrieval heads.")
    if runtime.config.kernel != "auto" and not current_platform.is_cuda():
        logger.warning("DUO option kernel=%s has no effect on %s: DUO runs its %s kernels there.",
                       runtime.config.kernel, current_platform.device_type, current_platform.device_type)
    check_plan_digest(vllm_config, runtime)
    _RUNTIMES[key] = runtime
    return runtime


# Set in ``additional_config`` by the front-end (``patches/engine_config_validation.py``): the
# digest of the plan it resolved. The config travels to every engine, worker and Ray process, so
# each can check that it resolved the same heads from its own files.
PLAN_DIGEST_KEY = "duo_plan_digest"


def record_plan_digest(vllm_config, runtime: DuoRuntime) -> None:
    recorded = {"model": vllm_config.model_config.model, "digest": runtime.plan_digest}
    vllm_config.additional_config = {**(vllm_config.additional_config or {}), PLAN_DIGEST_KEY: recorded}


def check_plan_digest(vllm_config, runtime: DuoRuntime) -> None:
    """Each process resolves the pattern from its own files (a path, the model folder, the shipped
    patterns). Under several hosts those can differ, and a pipeline stage would then serve its
    layers from another pattern than the stage before it, with no error from vLLM (stages share
    no layer, so vLLM never compares their specs): refuse instead."""
    recorded = (vllm_config.additional_config or {}).get(PLAN_DIGEST_KEY)
    # Only for the model the front-end resolved: a speculative draft model's config is the
    # target's with another model_config (vLLM copies additional_config into it).
    if not isinstance(recorded, dict) or recorded.get("model") != vllm_config.model_config.model:
        return
    expected = recorded.get("digest")
    if expected == runtime.plan_digest:
        return
    import socket

    raise DuoConfigError(
        f"DUO on host {socket.gethostname()} resolved a different head pattern ({runtime.pattern.source}, "
        f"plan {runtime.plan_digest}) than the front-end (plan {expected}): every node must find the same "
        "pattern file. Give the \"pattern\" option a path that holds the same file on every node, or "
        "install the same duo-vllm and model folder everywhere.")
