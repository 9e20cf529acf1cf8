"""What the DUO backends share on every platform: option checks, the per-layer head plan, the
split of each layer's heads between the platform's kernel (retrieval) and a streaming pass.
Platform files supply the streaming pass and glue these to vLLM's kernels.

::

    request r in the batch:   |<------------- seq_lens[r] ------------->|
                              |<---- context (cached) ---->|<- query ->|
                              0                 seq_lens[r] - q_len     seq_lens[r]
    a streaming query at i sees [0, sink) and [i - recent + 1, i]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import AttentionType, MultipleOf

from duo_vllm.backends.capabilities import FORCE_FLASHINFER
from duo_vllm.backends.head_plan import HeadPlan, plan_for_layer
from duo_vllm.head_order import REORDERED_FLAG, checkpoint_order_reason
from duo_vllm.kv_cache.spec import DuoStreamingSpec
from duo_vllm.kv_quant import kv_cache_dtype_error
from duo_vllm.runtime import runtime_from_vllm_config
from duo_vllm.vllm_support import platform_name


def check_supported(*, alibi_slopes, sliding_window, sinks, logits_soft_cap, attn_type, kv_cache_dtype) -> None:
    """The layer-time check of a DUO Impl.

    ALiBi slopes and logit soft-capping never reach vLLM's ``validate_configuration`` (its
    selector config does not carry them), so only this check sees them. Sinks, sliding windows
    and the attention type are declared on :class:`DuoBackendMixin`; vLLM checks those before the
    layer is built on CUDA, but its CPU platform never validates the selected backend (and DUO's
    patch, ``duo_vllm.patches.cpu_platform_backend``, only routes to it), so they are checked
    here again from those same declarations. The KV-cache dtype is refused in the front end
    (``duo_vllm.patches.engine_config_validation``); this covers engines built without EngineArgs.
    """
    dtype_error = kv_cache_dtype_error(kv_cache_dtype, platform_name(), get_current_vllm_config().model_config.dtype)
    if dtype_error:
        raise ValueError(dtype_error)
    unsupported = {
        "ALiBi slopes": alibi_slopes is not None,
        "a sliding window": sliding_window is not None and not DuoBackendMixin.supports_sliding_window(),
        "learned attention sinks": sinks is not None and not DuoBackendMixin.supports_sink(),
        "logit soft-capping": bool(logits_soft_cap),
        f"attention type {attn_type}": not DuoBackendMixin.supports_attn_type(attn_type),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"The DUO backend does not support {', '.join(bad)}; serve this model without "
            "--attention-backend DUO or change the listed setting."
        )


class DuoBackendMixin:
    """Mixed in before a platform's AttentionBackend; the platform file names its classes."""

    impl_cls: ClassVar[type]
    builder_cls: ClassVar[type]
    # Platform files list what DUO serves there (duo_vllm.kv_quant.SUPPORTED_KV_CACHE_DTYPES).
    supported_kv_cache_dtypes: ClassVar[list]
    # vLLM 0.33+: models that write K/V in a fused kernel ask this before skipping the backend's
    # own write; they would write every head into the retrieval-only cache and none into the
    # streaming one, so DUO always writes K/V itself. (No effect on 0.32, which lacks the flag.)
    supports_kv_cache_update_bypass: ClassVar[bool] = False

    @staticmethod
    def get_name() -> str:
        return "DUO"

    @classmethod
    def get_impl_cls(cls) -> type:
        return cls.impl_cls

    @classmethod
    def get_builder_cls(cls) -> type:
        return cls.builder_cls

    # What DUO serves, declared for vLLM's validate_configuration (run before any layer is built
    # on CUDA; check_supported reads the same declarations on CPU, where vLLM never validates).
    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        # Learned per-head sink logits (gpt-oss): DUO's streaming pass has no term for them.
        return False

    @classmethod
    def get_supported_kernel_block_sizes(cls, kv_cache_spec=None) -> list:
        # Streaming-head pages are read by DUO's own streaming pass, never by the platform
        # kernel, so their block size (chosen for capacity, duo_vllm.kv_cache.spec) is free.
        if isinstance(kv_cache_spec, DuoStreamingSpec):
            return [MultipleOf(1)]
        return super().get_supported_kernel_block_sizes(kv_cache_spec)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        # A layer's heads are split between two caches that share its one k/v scale.
        return False

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        """vLLM's reasons, with DUO's own words where a generic one would leave the user guessing."""
        reasons = super().validate_configuration(**kwargs)
        kv_cache_dtype = kwargs.get("kv_cache_dtype")
        attn_type = kwargs.get("attn_type")
        better = {
            "kv_cache_dtype not supported": kv_cache_dtype_error(kv_cache_dtype, platform_name())
            or (f"--kv-cache-dtype {kv_cache_dtype} is not read by the kernel DUO's retrieval heads run on this "
                "GPU (under FLASH_ATTN, FP8 needs FlashAttention 3: Hopper); use --kv-cache-dtype auto, or run them "
                f"on FLASHINFER with {FORCE_FLASHINFER}"),
            "per-head quant scales not supported": "this checkpoint's per-head KV-cache scales are not "
            "supported by DUO (per-tensor FP8 scales only); serve it with --kv-cache-dtype auto",
            "attention sinks not supported": "this model's learned attention sinks are not supported by DUO "
            "(its streaming heads keep the first tokens as sinks instead); serve it without --attention-backend DUO",
            "sliding window not supported": "this model's sliding-window attention layers are not supported by "
            "DUO; serve it without --attention-backend DUO",
            f"attention type {attn_type} not supported": f"DUO serves decoder self-attention only, not attention "
            f"type {attn_type}; serve this model without --attention-backend DUO",
        }
        return [better.get(reason, reason) for reason in reasons]


def select_heads(x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """``x[:, heads]``, also for FP8 tensors (vLLM's FP8 query), which torch cannot index."""
    if x.element_size() == 1 and x.is_floating_point():
        return x.view(torch.uint8)[:, heads].view(x.dtype)
    return x[:, heads]


def kernel_query_heads(kv_cache_spec, vllm_config) -> int:
    """Query heads the platform kernel sees for a layer group: a DUO layer's cache holds only its
    retrieval KV heads, and the kernel runs only their query heads (kernels size scheduling
    metadata and scratch space by this count)."""
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    group = model_config.get_num_attention_heads(parallel) // model_config.get_num_kv_heads(parallel)
    return kv_cache_spec.num_kv_heads * group


class DuoImplMixin:
    """Mixed in before a platform's AttentionImpl (which provides num_heads, head_size, scale and
    the stock kernel through ``super()``).

    The layer's own cache holds its retrieval heads (``FullAttentionSpec`` with that many heads),
    or its streaming heads when it has no retrieval heads; otherwise the streaming heads sit in
    the companion layer named ``layer.duo_streaming_layer_name`` (``duo_vllm.kv_cache``).
    """

    is_duo_impl: ClassVar[bool] = True  # head_plan.DUO_IMPL_MARKER

    # Whether the platform kernel takes query / output head slices with the whole layer's row
    # stride (then reordered layers need no copies around it); else contiguous copies.
    kernel_takes_head_slices: ClassVar[bool] = False

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        check_supported(alibi_slopes=alibi_slopes, sliding_window=sliding_window, sinks=sinks,
                        logits_soft_cap=logits_soft_cap, attn_type=attn_type, kv_cache_dtype=kv_cache_dtype)
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        # Resolving the pattern here makes every configuration error a start-up error.
        vllm_config = get_current_vllm_config()
        self.runtime = runtime_from_vllm_config(vllm_config)
        # None: duo_vllm.head_order may put this layer's retrieval heads first at load.
        self.checkpoint_order_reason = checkpoint_order_reason(vllm_config, self.runtime)
        self._plan: HeadPlan | None = None
        self._device_plans: dict[torch.device, HeadPlan] = {}

    def head_plan(self, layer, device: torch.device | None = None) -> HeadPlan:
        """The layer's head plan, with its index tensors on ``device`` when given (moved once,
        not at every step)."""
        if self._plan is None:
            self._plan = plan_for_layer(self.runtime, layer.layer_name, self.num_heads, self.num_kv_heads,
                                        heads_reordered=getattr(layer, REORDERED_FLAG, False))
        if device is None:
            return self._plan
        plan = self._device_plans.get(device)
        if plan is None:
            plan = self._device_plans[device] = self._plan.to(device)
        return plan

    def forget_head_plan(self) -> None:
        """Drop the cached plans (the layer's head order has changed)."""
        self._plan = None
        self._device_plans = {}

    def streaming_context(self, layer, kv_cache, attn_metadata, slot_mapping):
        """(cache, metadata, slot mapping) of the layer's streaming heads for this step."""
        name = layer.duo_streaming_layer_name
        if name == layer.layer_name:
            return kv_cache, attn_metadata, slot_mapping
        context = get_forward_context()
        metadata = context.attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0]
        return (context.no_compile_layers[name].kv_cache,
                metadata[name] if metadata is not None else None,
                context.slot_mapping.get(name) if isinstance(context.slot_mapping, dict) else None)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        plan = self.head_plan(layer, key.device)
        if plan.all_retrieval:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            return
        cache, _, streaming_slots = self.streaming_context(layer, kv_cache, None, slot_mapping)
        if streaming_slots is None:  # a dummy run without KV-cache metadata: nothing to store
            return
        self.write_kv(layer, plan, key, value, kv_cache, slot_mapping, cache, streaming_slots)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query [T, Hq, D]; kv_cache [blocks, heads in this cache, block_size, 2 * D];
        output [T, Hq, D] (or [T, Hq * D])."""
        plan = self.head_plan(layer, query.device)
        if attn_metadata is None or plan.all_retrieval:
            # Profiling / warm-up run (the platform decides what to return), or a layer whose
            # heads all keep full attention: exactly the stock kernel.
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        num_tokens = attn_metadata.num_actual_tokens
        out_heads = output[:num_tokens].view(num_tokens, self.num_heads, self.head_size)

        def retrieval() -> None:
            q_heads = plan.retrieval_q_heads
            r = plan.retrieval_kv_heads.numel()
            if plan.retrieval_first:
                # Heads reordered at load (duo_vllm.head_order): the retrieval heads are a slice.
                n = q_heads.numel()
                q_retrieval, out_retrieval = query[:num_tokens, :n], out_heads[:, :n]
            else:
                q_retrieval, out_retrieval = select_heads(query[:num_tokens], q_heads), None
            if out_retrieval is not None and self.kernel_takes_head_slices:
                self.retrieval_kernel_forward(layer, q_retrieval, key, value, kv_cache[:, :r], attn_metadata,
                                              out_retrieval, output_scale, output_block_scale)
            else:
                # [T, heads, D], as vLLM's Attention layer hands ``output`` to the kernels.
                partial = torch.empty(num_tokens, q_heads.numel(), self.head_size,
                                      dtype=output.dtype, device=output.device)
                self.retrieval_kernel_forward(layer, q_retrieval.contiguous(), key, value, kv_cache[:, :r],
                                              attn_metadata, partial, output_scale, output_block_scale)
                if out_retrieval is not None:
                    out_retrieval.copy_(partial)
                else:
                    out_heads[:, q_heads] = partial

        def streaming() -> None:
            cache, metadata, _ = self.streaming_context(layer, kv_cache, attn_metadata, None)
            self.streaming_forward(layer, plan, query, out_heads, cache, metadata)

        if plan.any_retrieval:
            self.run_both(retrieval, streaming)
        else:
            streaming()
        return output

    def retrieval_kernel_forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale) -> None:
        """The platform kernel over the retrieval heads: ``query`` [T, their query heads, D],
        ``kv_cache`` holding only their KV heads. A platform whose kernel sizes anything by the
        layer's full head count overrides this."""
        super(DuoImplMixin, self).forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                          output_scale, output_block_scale)

    def run_both(self, retrieval: Callable[[], None], streaming: Callable[[], None]) -> None:
        """Run a layer's retrieval and streaming heads (they write disjoint output heads); a
        platform may run them concurrently."""
        retrieval()
        streaming()

    def write_kv(self, layer, plan: HeadPlan, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, streaming_cache: torch.Tensor, streaming_slots: torch.Tensor) -> None:
        """Store a layer's new K/V (key/value [T, Hkv, D]): retrieval heads in the layer's own
        cache at ``slot_mapping`` (when it has any), streaming heads in ``streaming_cache``."""
        raise NotImplementedError

    def streaming_forward(self, layer, plan: HeadPlan, query: torch.Tensor, out_heads: torch.Tensor,
                          cache: torch.Tensor, metadata) -> None:
        """Write the streaming heads' Λ-masked attention into ``out_heads`` [T, Hq, D] (``query``
        may be FP8, quantized by vLLM's attention layer with ``layer._q_scale``)."""
        raise NotImplementedError
