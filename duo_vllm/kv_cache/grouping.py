"""Exactly two KV-cache groups for a DUO model: all retrieval specs, all streaming specs.

Both groups draw block ids from one pool; in a block-outermost layout (BLHNC) one block holds
every layer's page of both groups side by side, so per-layer head counts cost no padding
(vLLM's own grouping would split a per-layer pattern into many padded groups). The streaming
block size (``spec.streaming_block_size``) keeps the two groups' bytes per block balanced.
"""

from __future__ import annotations

from vllm.v1.kv_cache_interface import KVCacheGroupSpec, UniformTypeKVCacheSpecs

from duo_vllm.kv_cache.spec import DuoStreamingSpec


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
