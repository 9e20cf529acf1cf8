"""Exactly two KV-cache groups for a DUO model: all retrieval specs, all streaming specs.

Both groups draw block ids from one pool; in a block-outermost layout (BLHNC) one block holds
every layer's page of both groups side by side, so per-layer head counts cost no padding
(vLLM's own grouping would split a per-layer pattern into many padded groups). The streaming
block size (``spec.streaming_block_size``) keeps the two groups' bytes per block balanced.
"""

from __future__ import annotations

import logging

from vllm.v1.kv_cache_interface import KVCacheGroupSpec, UniformTypeKVCacheSpecs

from duo_vllm.kv_cache.spec import DuoStreamingSpec

logger = logging.getLogger("vllm.duo_vllm")


def duo_kv_cache_groups(vllm_config, kv_cache_spec: dict) -> list[KVCacheGroupSpec] | None:
    """The two groups, or None when the model has no DUO streaming layers (vLLM decides)."""
    streaming = {name: spec for name, spec in kv_cache_spec.items() if isinstance(spec, DuoStreamingSpec)}
    if not streaming:
        return None
    if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        raise ValueError(
            "The DUO backend keeps streaming heads in their own KV-cache group, which needs "
            "vLLM's hybrid KV-cache manager; remove --disable-hybrid-kv-cache-manager (or the "
            "setting that disables it, e.g. a KV connector without hybrid support).")
    retrieval = {name: spec for name, spec in kv_cache_spec.items() if name not in streaming}
    groups = []
    for specs, kind in ((retrieval, "retrieval"), (streaming, "streaming")):
        if not specs:
            continue
        uniform = UniformTypeKVCacheSpecs.from_specs(specs)
        if uniform is None:
            kinds = sorted({type(spec).__name__ for spec in specs.values()})
            raise ValueError(
                f"The DUO backend needs every {kind} layer to share one KV-cache type, got "
                f"{kinds}; models mixing attention types are not supported with DUO.")
        groups.append(KVCacheGroupSpec(list(specs), uniform))
    return groups


def peak_blocks_for_one_request(kv_cache_config, max_len: int) -> int:
    """Blocks one request of ``max_len`` tokens holds at its peak: its retrieval blocks plus, per
    streaming group, sink, window and the chunk in flight (never more than the whole request)."""
    needed = 0
    for group in kv_cache_config.kv_cache_groups:
        spec = _first_spec(group.kv_cache_spec)
        if isinstance(spec, DuoStreamingSpec):
            needed += min(spec.max_blocks_in_step(), -(-max_len // spec.block_size))
        else:
            needed += -(-max_len // spec.block_size)
    return needed


def check_one_request_fits(vllm_config, kv_cache_config) -> None:
    """Refuse a pool too small for one ``max_model_len`` request at its peak.

    vLLM's own check (and its ``--max-model-len -1`` auto-fit) counts each group's between-steps
    footprint; a streaming group also holds the blocks of the chunk it is computing (written
    before they are attended, freed right after), so one request at its largest needs its
    retrieval blocks plus sink, window and one chunk of ``max_num_batched_tokens`` of streaming
    blocks. Without this check such a request would wait forever instead of failing at start-up.
    Under auto-fit the length vLLM chose is lowered to the longest that fits this peak instead.
    """
    if not any(isinstance(_first_spec(g.kv_cache_spec), DuoStreamingSpec) for g in kv_cache_config.kv_cache_groups):
        return
    model_config = vllm_config.model_config
    max_len = model_config.max_model_len
    chunk = vllm_config.max_in_flight_tokens
    available = kv_cache_config.num_blocks
    needed = peak_blocks_for_one_request(kv_cache_config, max_len)
    if needed <= available:
        return
    if getattr(model_config, "original_max_model_len", None) == -1:
        low, high = 0, max_len  # the longest length whose peak fits (0: none)
        while low < high:
            mid = (low + high + 1) // 2
            if peak_blocks_for_one_request(kv_cache_config, mid) <= available:
                low = mid
            else:
                high = mid - 1
        if low > 0:
            logger.info("Auto-fit max_model_len: DUO lowered it from %d to %d so that one request "
                        "also fits with the streaming heads' prefill chunk of %d tokens in flight",
                        max_len, low, chunk)
            model_config.max_model_len = low
            return
    raise ValueError(
        f"The KV cache has {available} blocks but DUO needs {needed} to serve "
        f"one request of max_model_len={max_len} tokens (retrieval blocks plus the streaming "
        f"heads' sink, window and one prefill chunk of max_num_batched_tokens={chunk}). "
        "Give the KV cache more memory, or lower --max-model-len or --max-num-batched-tokens.")


def _first_spec(spec):
    return spec.first_spec if isinstance(spec, UniformTypeKVCacheSpecs) else spec
