"""The gated attention against a dense reference, and through real model families.

Reference: ``duo_vllm.reference.duo_attention`` (dense, fp32, one mask per head) with every head
retrieval (causal) or every head streaming (Lambda mask); the gated output must be
``alpha * causal + (1 - alpha) * streaming`` per KV head, for odd sizes, GQA ratios and chunkings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duo_vllm.reference import duo_attention, use_duo_reference
from gate_training.gated_attention import (
    GateState,
    attention_modules,
    gated_attention_forward,
    install_gates,
    lambda_mask,
)
from gate_training.preflight import probe_gated_routing
from tests.gate_training.conftest import tiny_model


class _Module(torch.nn.Module):
    """Stand-in attention module: what gated_attention_forward reads from a real one."""

    def __init__(self, state: GateState, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        object.__setattr__(self, "_duo_gate_state", state)


def _reference(q, k, v, alpha, sink, recent, scale):
    """alpha * causal + (1 - alpha) * streaming, dense fp32; q [1,Hq,T,D], k/v [1,Hk,T,D]."""
    hq, hk = q.shape[1], k.shape[1]
    args = (q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
    causal = duo_attention(*args, torch.ones(hq, dtype=torch.bool), sink=sink, recent=recent, scale=scale)
    stream = duo_attention(*args, torch.zeros(hq, dtype=torch.bool), sink=sink, recent=recent, scale=scale)
    a = alpha.repeat_interleave(hq // hk).view(1, -1, 1)
    return a * causal + (1 - a) * stream  # [T, Hq, D]


def test_lambda_mask_rule():
    for sink, recent in ((1, 1), (2, 3), (4, 2)):
        m = lambda_mask(9, 11, sink, recent)
        for qi in range(9):
            i = qi + 2
            for j in range(11):
                assert bool(m[qi, j]) == (j <= i and (j < sink or i - j < recent))


HEADS = [(4, 4), (6, 2), (5, 1)]
SIZES = [1, 7, 19, 99]
WINDOWS = [(1, 1), (4, 8), (16, 32)]


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hk{h[1]}")
@pytest.mark.parametrize("seq_len", SIZES)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"sink{w[0]}-recent{w[1]}")
@pytest.mark.parametrize("chunk", [3, 256])
def test_gated_forward_matches_reference(heads, seq_len, window, chunk):
    hq, hk = heads
    sink, recent = window
    gen = torch.Generator().manual_seed(seq_len * 31 + hq)
    q = torch.randn(1, hq, seq_len, 16, generator=gen)
    k = torch.randn(1, hk, seq_len, 16, generator=gen)
    v = torch.randn(1, hk, seq_len, 16, generator=gen)
    alpha = torch.rand(hk, generator=gen)
    state = GateState(gates=torch.nn.Parameter(alpha.view(1, -1).clone()), sink=sink, recent=recent,
                      chunk=chunk)
    out, weights = gated_attention_forward(_Module(state), q, k, v, None, scaling=0.25)
    assert weights is None and out.shape == (1, seq_len, hq, 16)
    expected = _reference(q, k, v, alpha, sink, recent, 0.25)
    torch.testing.assert_close(out[0], expected, atol=2e-5, rtol=1e-4,
                               msg=f"gated sdpa path, heads {heads}, T {seq_len}, {window}, chunk {chunk}")


def test_gate_gradient_matches_reference():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 41, 8, generator=gen)
    k = torch.randn(1, 2, 41, 8, generator=gen)
    v = torch.randn(1, 2, 41, 8, generator=gen)
    alpha = torch.rand(2, generator=gen)
    state = GateState(gates=torch.nn.Parameter(alpha.view(1, -1).clone()), sink=3, recent=5, chunk=4)
    out, _ = gated_attention_forward(_Module(state), q, k, v, None, scaling=0.3)
    weight = torch.randn(out.shape, generator=gen)
    (out * weight).sum().backward()

    ref_alpha = alpha.clone().requires_grad_(True)
    expected = _reference(q, k, v, ref_alpha, 3, 5, 0.3)
    (expected * weight[0]).sum().backward()
    torch.testing.assert_close(state.gates.grad[0], ref_alpha.grad, atol=1e-4, rtol=1e-4)


def test_teacher_mode_is_plain_causal_attention():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=gen) for _ in range(3))
    state = GateState(gates=torch.nn.Parameter(torch.zeros(1, 2)), sink=2, recent=4)
    with state.teacher():
        out, _ = gated_attention_forward(_Module(state), q, k, v, None, scaling=0.5)
    assert state.enabled
    expected = _reference(q, k, v, torch.ones(2), 2, 4, 0.5)
    torch.testing.assert_close(out[0], expected, atol=2e-5, rtol=1e-4)


def test_flex_streaming_matches_sdpa():
    """The CUDA path (FlexAttention + block mask) computes the same thing; checked on CPU here."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 6, 150, 16, generator=gen)
    k = torch.randn(1, 2, 150, 16, generator=gen)
    v = torch.randn(1, 2, 150, 16, generator=gen)
    alpha = torch.rand(1, 2, generator=gen)
    outs = {}
    for impl in ("sdpa", "flex"):
        state = GateState(gates=torch.nn.Parameter(alpha.clone()), sink=4, recent=24, streaming_impl=impl)
        try:
            outs[impl], _ = gated_attention_forward(_Module(state), q, k, v, None, scaling=0.25)
        except Exception as exc:
            if impl == "flex":
                pytest.skip(f"flex_attention cannot compile on this CPU: {type(exc).__name__}")
            raise
    torch.testing.assert_close(outs["flex"], outs["sdpa"], atol=1e-5, rtol=1e-4)


def test_rejects_padding_masks_and_cached_decoding():
    state = GateState(gates=torch.nn.Parameter(torch.ones(1, 1)), sink=1, recent=1)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unpadded"):
        gated_attention_forward(_Module(state), q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="use_cache=False"):
        gated_attention_forward(_Module(state), q[:, :, :1], q, q, None)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "qwen3moe", "llama31"])
def test_model_families_route_through_gates(family):
    """Gates at 1 reproduce the stock model; gates at 0 reproduce the dense all-streaming reference."""
    model = tiny_model(family)
    ids = torch.randint(0, 49152, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    state = install_gates(model, sink=4, recent=16)
    assert len(attention_modules(model)) == 2
    assert tuple(state.gates.shape) == (2, 2)
    assert not any(p is state.gates for p in model.parameters()), "gates must stay outside the model"
    probe_gated_routing(model, state, torch.device("cpu"))
    with torch.no_grad():
        ones = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        state.gates.zero_()
        zeros = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        state.gates.fill_(0.5)
        half = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(ones, stock, atol=1e-5, rtol=1e-4)
    use_duo_reference(model, np.zeros((2, 2), dtype=bool), sink=4, recent=16)
    with torch.no_grad():
        streaming = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(zeros, streaming, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(half, ones) and not torch.allclose(half, zeros)


def test_flex_raises_recompile_limits_only_during_its_call():
    """The compiled flex path needs more recompiles than dynamo's default; the raised limits apply
    to its own calls only, so a user's other compiled code keeps theirs."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import torch._dynamo

    from gate_training import gated_attention

    config = torch._dynamo.config
    before = (config.recompile_limit, config.accumulated_recompile_limit)
    with gated_attention._raised_recompile_limits():
        assert config.recompile_limit >= gated_attention.FLEX_RECOMPILE_LIMIT
        assert config.accumulated_recompile_limit >= 4 * gated_attention.FLEX_RECOMPILE_LIMIT
    assert (config.recompile_limit, config.accumulated_recompile_limit) == before
    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(1, 6, 150, 16, generator=gen), torch.randn(1, 2, 150, 16, generator=gen)
    state = GateState(gates=torch.nn.Parameter(torch.rand(1, 2, generator=gen)), sink=4, recent=24,
                      streaming_impl="flex")
    try:
        gated_attention_forward(_Module(state), q, k, k, None, scaling=0.25)
    except Exception as exc:
        pytest.skip(f"flex_attention cannot compile on this CPU: {type(exc).__name__}")
    assert (config.recompile_limit, config.accumulated_recompile_limit) == before
