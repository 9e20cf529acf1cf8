"""Give DUO layers their own KV-cache layout: retrieval heads paged, streaming heads sink + recent.

Why: vLLM (0.32-0.34) builds each attention layer's ``FullAttentionSpec`` from the layer's full head
count (the backend's ``customize_spec`` hook is only consulted for sliding-window layers), gives
a layer one spec only, and groups mixed specs by page size in ways that pad a per-layer head
pattern into many groups. DUO needs: (1) each layer's retrieval head count in its full-attention
spec, (2) a second spec for the streaming heads, (3) exactly two KV-cache groups (all retrieval
specs, all streaming specs) so the pool is shared without padding, (4) vLLM's scheduler to
know the streaming spec's manager, and (5) vLLM's "KV cache size: N tokens" to count a
streaming request's footprint between steps, not its in-step peak.
How: (1) wrap ``Attention.get_kv_cache_spec``; (2) wrap ``Attention.__init__`` to register a
companion cache layer (``duo_vllm.kv_cache.layers``); (3) wrap ``get_kv_cache_groups`` where
the release keeps it (``vllm_support.kv_cache_planning_module``; only when DUO streaming specs
are present); (4) register the spec and manager after vLLM's built-ins, also through the name
the engine core imported; (5) wrap ``kv_cache_utils.get_max_concurrency_for_kv_cache_config``
(the same in 0.32-0.34) to evaluate it under ``spec.between_steps_footprint``.
Pool sizing, the one-request check, auto-fit and admission need no patch: the streaming spec
reports its in-step peak through ``max_memory_usage_bytes`` as vLLM's sliding-window spec does.
Every wrapper leaves non-DUO layers and models untouched.
Remove when vLLM lets a backend report per-layer specs and groups itself.
"""

from __future__ import annotations

from duo_vllm.patches.wrapping import wrap_function


def register_duo_specs(vllm_config=None) -> None:
    """Register the streaming spec with its manager, after vLLM's built-ins (idempotent).

    Registering into an empty registry would stop vLLM from registering its own specs in this
    process, hence ``_ensure_registered`` first.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from duo_vllm.kv_cache.manager import DuoStreamingManager
    from duo_vllm.kv_cache.spec import DuoStreamingSpec

    KVCacheSpecRegistry._ensure_registered(vllm_config)
    KVCacheSpecRegistry.register(DuoStreamingSpec, DuoStreamingManager,
                                 uniform_type_base_spec=DuoStreamingSpec)


def _wrap_attention() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    from duo_vllm.backends.head_plan import is_duo_layer

    def wrap_init(original_init):
        def __init__(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            if not is_duo_layer(self):
                return  # other backends' layers stay exactly as vLLM builds them
            # Where this DUO layer's streaming heads are cached (read by DuoImplMixin); None: nowhere.
            self.duo_streaming_layer_name = None
            scheme = getattr(getattr(self, "quant_config", None), "kv_cache_scheme", None) or {}
            if scheme.get("strategy") == "attn_head":
                raise ValueError(
                    f"{self.layer_name}: this checkpoint's KV-cache scheme has per-head scales; DUO splits "
                    "each layer's heads between two caches and supports per-tensor FP8 scales only. Serve "
                    "it with --kv-cache-dtype auto, or without --attention-backend DUO.")
            from duo_vllm.kv_cache.layers import COMPANION_SUFFIX, DuoStreamingCache

            plan = self.impl.head_plan(self)
            slots = self.impl.runtime.head_slots
            if slots.streaming[plan.layer_index] == 0:
                return
            if slots.retrieval[plan.layer_index] == 0:
                self.duo_streaming_layer_name = self.layer_name
                return
            name = f"{self.layer_name}.{COMPANION_SUFFIX}"
            # Kept as an attribute (not a submodule) so the model's module tree stays stock.
            self.__dict__["duo_streaming_cache"] = DuoStreamingCache(
                name, self.attn_backend, self.impl.runtime, plan.layer_index, self.num_heads,
                self.head_size, self.head_size_v, self.kv_cache_torch_dtype)
            self.duo_streaming_layer_name = name

        return __init__

    def wrap_spec(original_spec):
        def get_kv_cache_spec(self, vllm_config):
            spec = original_spec(self, vllm_config)
            if spec is None or not is_duo_layer(self):
                return spec
            from duo_vllm.kv_cache.layers import layer_spec

            register_duo_specs(vllm_config)
            return layer_spec(spec, vllm_config, self.impl.runtime, self.impl.head_plan(self).layer_index)

        return get_kv_cache_spec

    wrap_function(Attention, "__init__", wrap_init)
    wrap_function(Attention, "get_kv_cache_spec", wrap_spec)


def _wrap_kv_cache_planning() -> None:
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine import core

    from duo_vllm.vllm_support import kv_cache_planning_module

    def wrap_groups(original):
        def get_kv_cache_groups(vllm_config, kv_cache_spec):
            from duo_vllm.kv_cache.grouping import duo_kv_cache_groups

            groups = duo_kv_cache_groups(vllm_config, kv_cache_spec)
            return groups if groups is not None else original(vllm_config, kv_cache_spec)

        return get_kv_cache_groups

    def wrap_concurrency(original):
        def get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config):
            from duo_vllm.kv_cache.spec import between_steps_footprint

            with between_steps_footprint():
                return original(vllm_config, kv_cache_config)

        return get_max_concurrency_for_kv_cache_config

    def wrap_registration(original):
        def register_all_kvcache_specs(vllm_config):
            original(vllm_config)
            register_duo_specs(vllm_config)

        return register_all_kvcache_specs

    # Looked up through the module at every call (vLLM's own callers import it inside functions).
    wrap_function(kv_cache_planning_module(), "get_kv_cache_groups", wrap_groups)
    wrap_function(kv_cache_utils, "get_max_concurrency_for_kv_cache_config", wrap_concurrency)
    # The engine core imported this one by name.
    wrap_function(core, "register_all_kvcache_specs", wrap_registration)


def apply() -> None:
    _wrap_attention()
    _wrap_kv_cache_planning()
