"""DUO's FLASHINFER classes (``duo_vllm.backends.cuda_flashinfer``) built on the CPU: what the
metadata builder plans for a group of retrieval caches, the streaming group's builder, the shared
workspace, and what the backend declares. Needs the ``flashinfer`` package (vLLM's FlashInfer
backend imports it; the CPU CI has none, so this module is skipped there). The kernels themselves
run on the GPU only: benchmarks/gpu_check_duo.py --kernel flashinfer."""

from __future__ import annotations

import pytest

pytest.importorskip("flashinfer")

import torch  # noqa: E402
from vllm.config import set_current_vllm_config  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport, KVCacheLayout, MultipleOf  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from duo_vllm.backends import cuda_flashinfer as fi  # noqa: E402
from duo_vllm.backends.cuda import DuoAttentionMetadataBuilder  # noqa: E402
from duo_vllm.kv_cache.spec import DuoStreamingSpec  # noqa: E402

LAYER = "model.layers.0.self_attn.attn"


class Layer(AttentionLayerBase):
    """What FlashInfer's builder reads of a group's layers: the impl's head count and scale."""

    def __init__(self, num_heads: int):
        self.impl = fi.DuoFlashInferImpl.__new__(fi.DuoFlashInferImpl)
        self.impl.num_heads, self.impl.scale = num_heads, 0.125
        self.impl.sliding_window, self.impl.logits_soft_cap, self.impl.sinks = None, None, None

    def get_attn_backend(self):
        return fi.DuoFlashInferBackend

    def get_kv_cache_spec(self, vllm_config):
        return None


@pytest.fixture(scope="module")
def config(smollm2):
    import duo_vllm

    duo_vllm.register()
    config = EngineArgs(model=smollm2, attention_backend="DUO", max_model_len=2048,
                        additional_config={"duo": {"sparsity": 0.5, "kernel": "flashinfer"}}).create_engine_config()
    config.compilation_config.static_forward_context[LAYER] = Layer(9)  # SmolLM2: 9 query, 3 KV heads
    return config


def spec(kv_heads: int) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=16, num_kv_heads=kv_heads, head_size=64, dtype=torch.bfloat16)


@pytest.mark.parametrize("retrieval", [1, 2, 3])
def test_a_group_is_planned_for_its_retrieval_heads_not_the_layers_count(config, retrieval):
    with set_current_vllm_config(config):
        builder = fi.DuoFlashInferMetadataBuilder(spec(retrieval), [LAYER], config, torch.device("cpu"))
    assert isinstance(builder, fi.DuoFlashInferMetadataBuilder)
    assert (builder.num_qo_heads, builder.num_kv_heads) == (3 * retrieval, retrieval)


def test_the_streaming_group_gets_the_metadata_the_triton_kernels_read(config):
    streaming = DuoStreamingSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.bfloat16, sink=64,
                                 recent=256)
    with set_current_vllm_config(config):
        builder = fi.DuoFlashInferMetadataBuilder(streaming, [LAYER], config, torch.device("cpu"))
    assert type(builder) is DuoAttentionMetadataBuilder


def test_one_workspace_per_device_sized_for_the_models_heads(config, monkeypatch):
    import weakref

    from vllm.v1.attention.backends.flashinfer import FlashInferMetadataBuilder

    # A floor below what the heads need, so the size follows them (8192 tokens x heads x 64 x 16 B).
    monkeypatch.setenv("VLLM_FLASHINFER_WORKSPACE_BUFFER_SIZE", str(2**20))
    monkeypatch.setattr(fi, "_WORKSPACES", weakref.WeakValueDictionary())
    with set_current_vllm_config(config):
        small, large = (fi.DuoFlashInferMetadataBuilder(spec(r), [LAYER], config, torch.device("cpu")) for r in (1, 3))
        stock = FlashInferMetadataBuilder(spec(3), [LAYER], config, torch.device("cpu"))
    shared = small._get_workspace_buffer()
    assert large._get_workspace_buffer() is shared
    tokens = config.scheduler_config.max_num_batched_tokens
    assert shared.numel() == stock._get_workspace_buffer().numel() == tokens * 9 * 64 * 16 > 2**20
    assert small.num_qo_heads == 3  # sizing for the model's heads left the group's own count alone


def test_cuda_graphs_never_beyond_uniform_batches(config, monkeypatch):
    for kv_spec in (spec(1), spec(3)):
        with set_current_vllm_config(config):  # as the model runner asks it
            support = fi.DuoFlashInferMetadataBuilder.get_cudagraph_support(config, kv_spec)
        assert support.value <= AttentionCGSupport.UNIFORM_BATCH.value
    # the streaming group: the answer of the builder it gets, whatever FlashInfer's rule says (as
    # on a GPU with XQA, where a head count that does not divide gives single-token decodes only)
    monkeypatch.setattr(fi.FlashInferMetadataBuilder, "get_cudagraph_support",
                        classmethod(lambda cls, *a: AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE))
    streaming = DuoStreamingSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.bfloat16, sink=8, recent=32)
    with set_current_vllm_config(config):
        assert (fi.DuoFlashInferMetadataBuilder.get_cudagraph_support(config, streaming)
                == DuoAttentionMetadataBuilder.get_cudagraph_support(config, streaming) == AttentionCGSupport.UNIFORM_BATCH)


def test_the_backend_declares_what_duo_serves():
    backend = fi.DuoFlashInferBackend
    assert backend.get_name() == "DUO"
    assert backend.get_impl_cls() is fi.DuoFlashInferImpl
    assert backend.get_builder_cls() is fi.DuoFlashInferMetadataBuilder
    assert backend.supports_kv_cache_update_bypass is False  # DUO writes both caches itself
    assert backend.supports_sliding_window() is False and backend.supports_sink() is False
    assert backend.get_supported_kernel_block_sizes(spec(2)) == [16, 32, 64]
    streaming = DuoStreamingSpec(block_size=48, num_kv_heads=1, head_size=64, dtype=torch.bfloat16, sink=8, recent=32)
    assert isinstance(backend.get_supported_kernel_block_sizes(streaming)[0], MultipleOf)
    assert set(backend.supported_kv_cache_layouts()) <= {KVCacheLayout.BLNHC, KVCacheLayout.BLHNC}
    assert "fp8" in backend.supported_kv_cache_dtypes and "nvfp4" not in backend.supported_kv_cache_dtypes


def test_the_impl_keeps_output_quantization_out(config):
    with set_current_vllm_config(config):
        impl = fi.DuoFlashInferImpl(9, 64, 0.125, 3, None, None, "auto")
    assert impl.fused_output_quant_supported(None) is False
    assert impl.streaming.num_heads == 9 and impl.kernel_takes_head_slices is False
