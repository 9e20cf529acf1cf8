"""Reordering a layer's heads (retrieval first) leaves the attention layer's output unchanged.

vLLM's own QKVParallelLinear / RowParallelLinear (one CPU rank), reordered the way the load hook
does it and then post-processed by vLLM (on CPU that packs the weights, so the order matters),
against the same layer in the checkpoint's order; attention in plain torch (causal, GQA).
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duo_vllm.backends.head_plan import plan_for_layer
from duo_vllm.config import DuoConfig
from duo_vllm.head_order import _not_reorderable, head_rows, reorder_layer_heads
from duo_vllm.pattern import HeadPattern
from duo_vllm.runtime import DuoRuntime

HIDDEN = 32


@pytest.fixture(scope="module")
def linear_layers():
    """vLLM's linear layer classes, inside a one-rank (gloo) tensor-parallel group."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1)
        from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

        yield QKVParallelLinear, RowParallelLinear
        destroy_model_parallel()
        destroy_distributed_environment()


def make_layer(linear_layers, num_kv: int, group: int, head_size: int, bias: bool, seed: int):
    qkv_cls, row_cls = linear_layers
    torch.manual_seed(seed)
    qkv = qkv_cls(HIDDEN, head_size, num_kv * group, num_kv, bias=bias, params_dtype=torch.float32)
    o_proj = row_cls(num_kv * group * head_size, HIDDEN, bias=False, params_dtype=torch.float32)
    for param in (*qkv.parameters(), *o_proj.parameters()):
        param.data.normal_()
    return qkv, o_proj


def attention_layer_output(qkv, o_proj, x: torch.Tensor) -> torch.Tensor:
    """x [T, hidden] -> o_proj(causal GQA attention(qkv(x))), through the vLLM layers."""
    num_q, num_kv, d = qkv.num_heads, qkv.num_kv_heads, qkv.head_size
    out = qkv(x)[0]
    q, k, v = out.split([num_q * d, num_kv * d, num_kv * d], dim=-1)
    heads = lambda t, n: t.view(-1, n, d).transpose(0, 1)  # noqa: E731
    attn = torch.nn.functional.scaled_dot_product_attention(
        heads(q, num_q), heads(k, num_kv), heads(v, num_kv), is_causal=True, enable_gqa=True)
    return o_proj(attn.transpose(0, 1).reshape(-1, num_q * d))[0]


def process_after_loading(*layers) -> None:
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_kv=st.integers(1, 5), group=st.integers(1, 3), head_size=st.sampled_from([4, 8]),
       bias=st.booleans(), data=st.data())
def test_reordered_layer_gives_the_same_output(linear_layers, num_kv, group, head_size, bias, data):
    retrieval = np.array(data.draw(st.lists(st.booleans(), min_size=num_kv, max_size=num_kv)))
    seed = data.draw(st.integers(0, 2**16))
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(seed))

    plain_qkv, plain_o = make_layer(linear_layers, num_kv, group, head_size, bias, seed)
    process_after_loading(plain_qkv, plain_o)
    want = attention_layer_output(plain_qkv, plain_o, x)

    qkv, o_proj = make_layer(linear_layers, num_kv, group, head_size, bias, seed)
    k_before = qkv.weight.data[num_kv * group * head_size:][: num_kv * head_size].clone()
    kv_order = torch.cat([torch.nonzero(torch.from_numpy(retrieval)).flatten(),
                          torch.nonzero(~torch.from_numpy(retrieval)).flatten()])
    reorder_layer_heads(qkv, o_proj, kv_order, group)
    # New KV head i is old head kv_order[i]: the retrieval heads now come first.
    k_after = qkv.weight.data[num_kv * group * head_size:][: num_kv * head_size]
    assert torch.equal(k_after, k_before[head_rows(kv_order, head_size)])
    process_after_loading(qkv, o_proj)
    torch.testing.assert_close(attention_layer_output(qkv, o_proj, x), want, rtol=1e-4, atol=1e-4)


def test_what_cannot_be_reordered(linear_layers):
    qkv, o_proj = make_layer(linear_layers, 2, 2, 8, False, 0)
    module = torch.nn.Module()
    module.qkv_proj, module.o_proj = qkv, o_proj
    assert _not_reorderable(module, qkv, o_proj, 4, 2) is None
    module.q_norm = torch.nn.LayerNorm(8)  # one head's width, shared by all heads: safe
    assert _not_reorderable(module, qkv, o_proj, 4, 2) is None
    assert "query / " in _not_reorderable(module, qkv, o_proj, 2, 1)
    assert "projections" in _not_reorderable(module, torch.nn.Linear(4, 4), o_proj, 4, 2)
    module.head_scale = torch.nn.Parameter(torch.ones(4))  # per head: order unknown to us
    assert "head_scale" in _not_reorderable(module, qkv, o_proj, 4, 2)


def test_plan_of_a_reordered_layer_has_its_retrieval_heads_first():
    mask = np.array([[False, True, False, True], [True, True, False, False]])
    pattern = HeadPattern(gates=mask.astype(np.float32), model_name="toy")
    runtime = DuoRuntime(DuoConfig(), pattern, 0.5, mask)
    checkpoint_order = plan_for_layer(runtime, "model.layers.0.self_attn.attn", 8, 4)
    assert checkpoint_order.retrieval_kv_heads.tolist() == [1, 3]
    assert checkpoint_order.retrieval_q_heads.tolist() == [2, 3, 6, 7]
    assert not checkpoint_order.retrieval_first
    reordered = plan_for_layer(runtime, "model.layers.0.self_attn.attn", 8, 4, heads_reordered=True)
    assert reordered.retrieval_kv_heads.tolist() == [0, 1]
    assert reordered.streaming_q_heads.tolist() == [4, 5, 6, 7]
    assert reordered.retrieval_first
    # Already retrieval-first in the checkpoint: the slice path needs no reordering.
    assert plan_for_layer(runtime, "model.layers.1.self_attn.attn", 8, 4).retrieval_first


@pytest.mark.parametrize("engine_args,reason", [
    ({}, None),
    ({"enable_lora": True}, "LoRA"),
    ({"additional_config": {"duo": {"reorder_heads": False}}}, "reorder_heads is false"),
])
def test_when_heads_keep_the_checkpoint_order(smollm2, engine_args, reason):
    from vllm.engine.arg_utils import EngineArgs

    from duo_vllm.head_order import checkpoint_order_reason
    from duo_vllm.runtime import runtime_from_vllm_config

    args = {"additional_config": {"duo": {"sparsity": 0.5}}, **engine_args}
    config = EngineArgs(model=smollm2, max_model_len=1024, attention_backend="DUO", **args).create_engine_config()
    got = checkpoint_order_reason(config, runtime_from_vllm_config(config))
    assert got == reason if reason is None else reason in got
