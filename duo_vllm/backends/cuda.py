"""DUO attention on NVIDIA GPUs.

Retrieval heads go through vLLM's FLASH_ATTN kernel (FA3 on Hopper) on the layer's own paged
cache, which holds only those heads; streaming heads through one Triton launch per layer over
the compact sink + window cache (``duo_vllm.ops.triton_streaming``), reading only keys their Λ
mask lets them see. Neither needs host-side request layouts, so uniform decode batches run
inside full CUDA graphs; mixed prefill/decode steps run attention between piecewise graphs, as
FLASH_ATTN's own mixed steps do under vLLM's default FULL_AND_PIECEWISE mode.

FP8 KV cache (``--kv-cache-dtype fp8``): both groups' pages hold e4m3 codes with the layer's
per-tensor k/v scales. vLLM's attention layer quantizes the query for FA3 (as for stock
FLASH_ATTN); FA3 reads the retrieval heads with its FP8 path, the Triton kernels widen the FP8
query and pages in registers, and the fused store writes codes as vLLM's CUDA cache write does.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import ClassVar

import torch
from vllm.config import (
    get_current_vllm_config,
    get_current_vllm_config_or_none,
    set_current_vllm_config,
)
from vllm.utils.torch_utils import aux_stream, current_stream
from vllm.v1.attention.backend import AttentionCGSupport, KVCacheLayout
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from duo_vllm.backends.common import DuoBackendMixin, DuoImplMixin, kernel_query_heads
from duo_vllm.kv_cache.spec import DuoStreamingSpec
from duo_vllm.kv_quant import SUPPORTED_KV_CACHE_DTYPES, fp8_dtype
from duo_vllm.ops.triton_streaming import lambda_paged_attention, store_kv_heads

MAX_FA3_SPLITS = 128  # FA3's own cap on split-KV decode


def fa3_decode_split_bound(num_sms: int, kv_heads: int, default: int) -> int:
    """The split bound FA3 gets under CUDA graphs for a layer group with ``kv_heads`` heads.

    FA3 picks each decode request's split count on the device (``flash_prepare_scheduler.cu``):
    about one (head, split) tile per SM, so at batch 1 at most ceil(num_sms / (1.1 * heads)),
    clipped to this bound. vLLM's default (32) clips that only for layers of fewer than ~4 heads,
    which would leave SMs idle: raise the bound to what FA3 can use there, and no further, since
    FA3 sizes its combine step by the bound (H200 decode profile, Llama-2-7B at 64K: the combine
    took 0.25 ms per token under DUO's earlier bounds of up to 128, with a quarter of the heads,
    against 0.09 ms for stock's 32). Heads count as KV heads (FA3 packs a KV head's query heads
    into one tile at decode; unpacked, more heads need fewer splits, so this is still an upper
    bound). One split more than the formula covers float rounding in FA3's ceilf.
    """
    return min(MAX_FA3_SPLITS, max(default, math.ceil(num_sms / (1.1 * kv_heads)) + 1))


class DuoAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    """FLASH_ATTN's metadata, for both KV-cache groups.

    Full graphs for uniform batches only: the streaming kernel's grid follows the step's longest
    query, fixed when a graph is captured (1 for decode).
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # FA3's ahead-of-time schedule is per query-head count.
        self.num_heads_q = kernel_query_heads(kv_cache_spec, vllm_config)
        if isinstance(kv_cache_spec, DuoStreamingSpec):
            # FA3 never reads the streaming group: no schedule to plan for it.
            self.aot_schedule = False
        elif self.max_num_splits:
            # Under CUDA graphs FA3 splits a decode query's keys at most max_num_splits ways.
            self.max_num_splits = fa3_decode_split_bound(
                torch.cuda.get_device_properties(device).multi_processor_count,
                kv_cache_spec.num_kv_heads, self.max_num_splits)

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        # A shared-prefix cascade would split requests differently in the two groups.
        return False


class TritonStreaming:
    """Streaming heads on the GPU (``duo_vllm.ops.triton_streaming``): held by the Impl as its
    streaming pass. Both kernels read everything from device tensors, so they run inside CUDA graphs.

    With an FP8 KV cache (vLLM allocates it as bytes) the pages are viewed as their FP8 dtype;
    the kernels then read and write e4m3 codes with the layer's per-tensor k/v scales.
    """

    def __init__(self, *, num_heads: int, head_size: int, scale: float, kv_cache_dtype: str,
                 sink: int, recent: int):
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.sink, self.recent = sink, recent
        self.fp8 = fp8_dtype(kv_cache_dtype)

    def pages(self, cache: torch.Tensor) -> torch.Tensor:
        """A cache as the kernels read it: FP8 caches are allocated as bytes."""
        return cache if self.fp8 is None else cache.view(self.fp8)

    def write(self, layer, plan, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor, streaming_cache: torch.Tensor, streaming_slots: torch.Tensor) -> None:
        """Store a layer's new K/V (key/value [T, Hkv, D]): retrieval heads in ``kv_cache`` at
        ``slot_mapping``, streaming heads in ``streaming_cache`` at ``streaming_slots``, in one
        launch (FLASH_ATTN's own write would need the retrieval heads copied out of key/value first)."""
        store_kv_heads(key, value, [(plan.retrieval_kv_heads, self.pages(kv_cache), slot_mapping),
                                    (plan.streaming_kv_heads, self.pages(streaming_cache), streaming_slots)],
                       k_scale=layer._k_scale, v_scale=layer._v_scale)

    def forward(self, layer, plan, query, out_heads, cache, metadata) -> None:
        """Write the streaming heads' Λ-masked attention into ``out_heads`` [T, Hq, D], one launch
        for the batch over the streaming group's block table (``metadata``: FLASH_ATTN's)."""
        num_tokens = out_heads.shape[0]
        lambda_paged_attention(
            query[:num_tokens].view(num_tokens, self.num_heads, self.head_size), out_heads, self.pages(cache),
            metadata.block_table, metadata.query_start_loc, metadata.seq_lens, metadata.max_query_len,
            plan.streaming_q_heads, num_kv_heads=plan.streaming_kv_heads.numel(),
            sink=self.sink, recent=self.recent, scale=self.scale,
            q_scale=layer._q_scale, k_scale=layer._k_scale, v_scale=layer._v_scale,
        )


class TritonStreamingImpl(DuoImplMixin):
    """A CUDA DUO impl's streaming side, whatever vLLM kernel runs its retrieval heads: the
    streaming heads and both caches' K/V store through the Impl's ``TritonStreaming``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.streaming = TritonStreaming(num_heads=self.num_heads, head_size=self.head_size, scale=self.scale,
                                         kv_cache_dtype=self.kv_cache_dtype, sink=self.runtime.sink,
                                         recent=self.runtime.recent)

    def write_kv(self, layer, plan, key, value, kv_cache, slot_mapping, streaming_cache, streaming_slots) -> None:
        self.streaming.write(layer, plan, key, value, kv_cache, slot_mapping, streaming_cache, streaming_slots)

    def streaming_forward(self, layer, plan, query, out_heads, cache, metadata) -> None:
        self.streaming.forward(layer, plan, query, out_heads, cache, metadata)


class DuoAttentionImpl(TritonStreamingImpl, FlashAttentionImpl):
    """Retrieval heads: FLASH_ATTN's kernel (FA3) on their own head counts; streaming heads and
    both caches' K/V store: the Triton pass."""

    # FlashAttention takes q and out with any row and head strides (last dim contiguous).
    kernel_takes_head_slices = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # vLLM's one auxiliary stream (its MoE shared-expert overlap uses it too). Not with
        # micro-batching (DBO), whose two threads would share this layer's events.
        ubatching = get_current_vllm_config().parallel_config.use_ubatching
        overlap = self.runtime.config.overlap_streaming and not ubatching
        self._side_stream = aux_stream() if overlap else None
        if self._side_stream is not None:
            self._inputs_ready, self._streaming_done = torch.cuda.Event(), torch.cuda.Event()
        self._retrieval_kernels: dict[int, FlashAttentionImpl] = {}
        # The engine's config, for the retrieval kernels built at the first forward: FLASH_ATTN
        # reads its FlashAttention version (``--attention-config '{"flash_attn_version": 2}'``)
        # and context-parallel settings from the current config, which vLLM sets while it builds
        # layers but not while it runs them.
        self._engine_config = get_current_vllm_config_or_none()

    def run_both(self, retrieval, streaming) -> None:
        """With ``overlap_streaming``: streaming heads on the side stream while FA3 runs the
        retrieval heads.

        At batch-1 decode the streaming kernels' few programs are latency-bound (H200: 0.18-0.28
        ms per token in series), and FA3's split count leaves some SMs idle. Side by side they
        hide part of that but also slow FA3 (H200 profiles in docs/STATUS.md: a net gain with
        many streaming heads, a net loss with few), hence off by default. Events, not stream
        syncs, so CUDA-graph capture records the fork and join; the join comes before the layer
        returns, so nothing the main stream frees or reuses afterwards is still being read.
        """
        if self._side_stream is None:
            super().run_both(retrieval, streaming)
            return
        main = current_stream()
        self._inputs_ready.record(main)
        with torch.cuda.stream(self._side_stream):
            self._inputs_ready.wait(self._side_stream)
            streaming()
            self._streaming_done.record(self._side_stream)
        retrieval()
        self._streaming_done.wait(main)

    def retrieval_kernel_forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale) -> None:
        # FLASH_ATTN sizes its FP8 descales by the impl's KV head count, so the retrieval heads
        # get a FLASH_ATTN impl of their own head counts (same kernel, version and options).
        kernel = self.retrieval_kernel(query.shape[1], kv_cache.shape[1])
        kernel.forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)

    def retrieval_kernel(self, num_q_heads: int, num_kv_heads: int) -> FlashAttentionImpl:
        """FLASH_ATTN's impl for ``num_kv_heads`` retrieval heads, built once under the engine's
        config, so it runs the FlashAttention version this layer's own impl chose."""
        kernel = self._retrieval_kernels.get(num_kv_heads)
        if kernel is None:
            config = self._engine_config
            with set_current_vllm_config(config) if config is not None else nullcontext():
                kernel = FlashAttentionImpl(num_q_heads, self.head_size, self.scale, num_kv_heads, None, None,
                                            self.kv_cache_dtype, None, self.attn_type)
            self._retrieval_kernels[num_kv_heads] = kernel
        return kernel


class DuoAttentionBackend(DuoBackendMixin, FlashAttentionBackend):
    impl_cls = DuoAttentionImpl
    builder_cls = DuoAttentionMetadataBuilder
    # FLASH_ATTN's FP8 check (FA3 only) still applies on top (supports_kv_cache_dtype).
    supported_kv_cache_dtypes = list(SUPPORTED_KV_CACHE_DTYPES["cuda"])

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Block-outermost: both KV-cache groups' pages of every layer share one block
        # (duo_vllm.kv_cache.grouping); FlashAttention reads the cache through its strides.
        return (KVCacheLayout.BLNHC, KVCacheLayout.BLHNC)
