"""DUO attention on NVIDIA GPUs through vLLM's FLASHINFER backend (DUO option ``"kernel"``; the
default on Blackwell, as vLLM's own).

Retrieval heads go through FlashInfer's paged prefill and decode wrappers on the layer's own
cache, which holds only those heads; streaming heads and both caches' K/V store through DUO's
Triton pass (``TritonStreaming``, shared with the FLASH_ATTN backend in ``cuda.py``).
``FlashInferImpl.forward`` takes every head count from its tensors (bf16/fp16/FP8 caches), so the
DUO impl runs it itself over the retrieval heads; what sizes anything by head counts lives in the
metadata builder, which plans each layer group for its retrieval heads.

The streaming KV-cache group reports the same backend (its pages belong to DUO layers), so its
builder is this class too: ``DuoFlashInferMetadataBuilder`` hands that group FLASH_ATTN's
metadata (``DuoAttentionMetadataBuilder``), which is what the Triton kernels read, and which needs
no FlashInfer impl behind every layer of the group as FlashInfer's builder does.
"""

from __future__ import annotations

import weakref

from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionCGSupport, KVCacheLayout, MultipleOf
from vllm.v1.attention.backends.flashinfer import (
    FlashInferBackend,
    FlashInferImpl,
    FlashInferMetadata,
    FlashInferMetadataBuilder,
)

from duo_vllm.backends.capabilities import FLASHINFER_BLOCK_SIZES
from duo_vllm.backends.common import DuoBackendMixin, kernel_query_heads
from duo_vllm.backends.cuda import DuoAttentionMetadataBuilder, TritonStreamingImpl
from duo_vllm.kv_cache.spec import DuoStreamingSpec
from duo_vllm.kv_quant import SUPPORTED_KV_CACHE_DTYPES

# One FlashInfer float workspace per device (and engine shape) for every DUO layer group, sized as stock's (the
# model's query heads): each group's builder would otherwise allocate its own (at least 394 MiB),
# after the KV cache has taken the memory. The groups' kernels run one after another on one stream.
_WORKSPACES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class DuoFlashInferMetadataBuilder(FlashInferMetadataBuilder):
    """FLASHINFER's metadata for a group of retrieval caches, planned for their head counts."""

    def __new__(cls, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs):
        if isinstance(kv_cache_spec, DuoStreamingSpec):
            # Python skips __init__ when __new__ returns an instance of another class.
            return DuoAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs) -> None:
        # Before FlashInfer's __init__, which derives its decode kernel and page checks from it.
        self._duo_qo_heads = kernel_query_heads(kv_cache_spec, vllm_config)
        self._model_qo_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, *args, **kwargs)

    @property
    def num_qo_heads(self) -> int:
        """The query heads FlashInfer's kernels run for this group: its retrieval KV heads' (the
        layers report their whole head count, which FlashInfer's __init__ would plan for)."""
        return self._duo_qo_heads

    @num_qo_heads.setter
    def num_qo_heads(self, _layers_heads: int) -> None:
        pass

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if isinstance(kv_cache_spec, DuoStreamingSpec):
            # vLLM's V1 runner asks the class, which __new__'s dispatch does not reach: the streaming
            # group answers as the builder it gets (FlashInfer's rule would judge its head count).
            return DuoAttentionMetadataBuilder.get_cudagraph_support(vllm_config, kv_cache_spec)
        # FlashInfer's answer judges each group's KV heads against the model's query heads (a
        # bound on what this builder uses: DUO's r*g over r heads always divides); DUO's streaming
        # kernel caps it at uniform batches (its grid follows the longest query, fixed at capture).
        support = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        return min(support, AttentionCGSupport.UNIFORM_BATCH, key=lambda s: s.value)

    def _get_workspace_buffer(self):
        if self._workspace_buffer is None:
            # What vLLM sizes it by: an engine of another shape in the same process gets its own.
            key = (str(self.device), self._model_qo_heads, self.head_dim, self.max_num_batched_tokens)
            shared = _WORKSPACES.get(key)
            if shared is None:
                own, self._duo_qo_heads = self._duo_qo_heads, self._model_qo_heads
                try:
                    shared = super()._get_workspace_buffer()  # vLLM's own sizing, for the model's heads
                finally:
                    self._duo_qo_heads = own
                _WORKSPACES[key] = shared
            self._workspace_buffer = shared
        return self._workspace_buffer

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        # A shared-prefix cascade would split requests differently in the two groups.
        return False


class DuoFlashInferImpl(TritonStreamingImpl, FlashInferImpl):
    """Retrieval heads: ``FlashInferImpl.forward`` on a contiguous copy of their query heads (its
    output is a bare pointer with the query's shape); streaming heads and the K/V store: Triton."""

    kernel_takes_head_slices = False

    def fused_output_quant_supported(self, quant_key) -> bool:
        # The streaming heads write the layer's output unquantized.
        return False


class DuoFlashInferBackend(DuoBackendMixin, FlashInferBackend):
    impl_cls = DuoFlashInferImpl
    builder_cls = DuoFlashInferMetadataBuilder
    supported_kv_cache_dtypes = list(SUPPORTED_KV_CACHE_DTYPES["cuda"])

    @classmethod
    def get_supported_kernel_block_sizes(cls, kv_cache_spec=None) -> list:
        # DuoBackendMixin's (any size for the streaming pages), else FlashInfer's without the
        # trtllm-gen large pages: those are offered for the layer's whole head count.
        sizes = super().get_supported_kernel_block_sizes(kv_cache_spec)
        return [s for s in sizes if isinstance(s, MultipleOf) or s in FLASHINFER_BLOCK_SIZES]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Block-outermost (duo_vllm.kv_cache.grouping); Blackwell's trtllm-gen kernels read
        # head-major blocks.
        capability = current_platform.get_device_capability()
        if capability is not None and capability.major == 10:
            return (KVCacheLayout.BLHNC,)
        return (KVCacheLayout.BLNHC, KVCacheLayout.BLHNC)


__all__ = ["DuoFlashInferBackend", "DuoFlashInferImpl", "DuoFlashInferMetadataBuilder", "FlashInferMetadata"]
