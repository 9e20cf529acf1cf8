"""Gated mix of full and streaming attention, plugged into Hugging Face models.

DuoAttention learns one gate ``alpha`` per (layer, KV head). During training every attention
layer outputs, per head::

    alpha * full_causal_attention + (1 - alpha) * streaming_attention

where streaming attention uses the exact Lambda mask that the vLLM backend serves: query ``i``
sees key ``j`` iff ``j <= i`` and (``j < sink`` or ``i - j < recent``). The gate of a KV head
applies to all of its grouped query heads.

Why the attention interface: transformers lets a model call a registered attention function
(``AttentionInterface``) with ``(module, query, key, value, attention_mask, scaling, ...)`` after
projections and RoPE. Registering one function therefore covers Llama, Qwen2, Mistral and every
other decoder that dispatches through it, with no per-model code (the reference implementation
keeps a monkey-patched copy of each model's forward instead).

The gates live outside the model (a :class:`GateState` object hung on each attention module as a
plain attribute), so the frozen model's ``parameters()`` stay untouched and the same model serves
as the teacher: :meth:`GateState.teacher` switches every layer to plain causal attention.

Memory: the full part is ``torch.nn.functional.scaled_dot_product_attention`` with
``is_causal`` (flash kernels on CPU and CUDA, no score matrix kept). The streaming part is either
SDPA over blocks of queries, each against only the keys it can see (sinks + a band of recent
keys) with a small boolean Lambda mask (``"sdpa"``: linear in context, the CPU default) or FlexAttention with
a block mask built from a ``mask_mod`` (``"flex"``: on CUDA it skips the blocks outside sink +
recent, so 32K-token training fits).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "duo_gated"
STREAMING_IMPLS = ("sdpa", "flex")

__all__ = [
    "ATTN_IMPLEMENTATION",
    "STREAMING_IMPLS",
    "GateState",
    "attention_modules",
    "gated_attention_forward",
    "install_gates",
    "lambda_mask",
]


def lambda_mask(q_len: int, kv_len: int, sink: int, recent: int, device: Any = None) -> torch.Tensor:
    """Boolean streaming mask ``[q_len, kv_len]``; True where query ``i`` may see key ``j``.

    Queries are the last ``q_len`` of ``kv_len`` positions (``i`` is absolute).
    """
    i = torch.arange(kv_len - q_len, kv_len, device=device).view(-1, 1)
    j = torch.arange(kv_len, device=device).view(1, -1)
    return (j <= i) & ((j < sink) | (i - j < recent))


def _lambda_mask_mod(sink: int, recent: int):
    """FlexAttention ``mask_mod`` of the Lambda mask (same rule as :func:`lambda_mask`)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < sink) | (q_idx - kv_idx < recent))

    return mask_mod


_COMPILED_FLEX = None
FLEX_RECOMPILE_LIMIT = 256  # dynamo's recompile_limit while the compiled flex_attention runs


def _raised_recompile_limits():
    """A context raising dynamo's recompile limits (never lowering them) while it is open.

    Scoped to the compiled flex call so the user's other compiled code keeps its own limits;
    both limits are read at run time (``compile_ignored``), so patching them per call neither
    recompiles nor costs more than a dict update. Limits this torch lacks are left out.
    """
    import torch._dynamo

    config = torch._dynamo.config
    limits = {}
    if hasattr(config, "recompile_limit"):
        limits["recompile_limit"] = max(config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    if hasattr(config, "accumulated_recompile_limit"):
        limits["accumulated_recompile_limit"] = max(
            config.accumulated_recompile_limit, 4 * limits.get("recompile_limit", FLEX_RECOMPILE_LIMIT)
        )
    return config.patch(**limits)


def _flex_attention():
    """``flex_attention`` compiled once per process (uncompiled it materialises the scores).

    Compiled for dynamic lengths: every training sample has its own context length, and a static
    graph per length recompiled on every step (measured on an H100: ~6 s/step for Qwen2.5-0.5B,
    almost all of it compiling). Each call runs under raised recompile limits
    (:func:`_raised_recompile_limits`), covering the few graphs dynamo still specialises (e.g.
    lengths 0/1 or divisibility guards).
    """
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=True)

        def flex_with_raised_limits(*args, **kwargs):
            if torch.compiler.is_compiling():  # traced into a caller's graph: its limits apply
                return compiled(*args, **kwargs)
            with _raised_recompile_limits():
                return compiled(*args, **kwargs)

        _COMPILED_FLEX = flex_with_raised_limits
    return _COMPILED_FLEX


@dataclass(eq=False)
class GateState:
    """The trainable gates and the streaming geometry shared by all gated layers.

    Parameters
    ----------
    gates : torch.nn.Parameter, float32, shape [num_layers, num_kv_heads]
    sink, recent : int
        Streaming heads see the first ``sink`` and the last ``recent`` positions.
    streaming_impl : "sdpa" or "flex"
    enabled : bool
        False runs plain causal attention (the teacher) in every layer.
    """

    gates: torch.nn.Parameter
    sink: int
    recent: int
    streaming_impl: str = "sdpa"
    enabled: bool = True
    chunk: int = 256  # queries per block of the "sdpa" streaming path
    calls: int = 0  # attention calls seen; lets the set-up probe prove every layer is routed here
    _block_masks: dict = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def teacher(self):
        """Run the wrapped model as the unmodified full-attention model inside this block."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def block_mask(self, q_len: int, kv_len: int, device: torch.device):
        """FlexAttention block mask of the Lambda pattern, built once per shape and shared by layers."""
        key = (q_len, kv_len, str(device))
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            if len(self._block_masks) > 64:
                self._block_masks.clear()
            self._block_masks[key] = create_block_mask(
                _lambda_mask_mod(self.sink, self.recent), None, None, q_len, kv_len, device=device
            )
        return self._block_masks[key]


def _full_attention(query, key, value, scale):
    return F.scaled_dot_product_attention(
        query, key, value, is_causal=query.shape[2] > 1, scale=scale, enable_gqa=True
    )


def _streaming_attention(state: GateState, query, key, value, scale, full):
    """Lambda-masked attention ``[B, Hq, T, D]``; rows before ``recent`` equal ``full`` exactly."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if state.streaming_impl == "flex":
        block_mask = state.block_mask(q_len, kv_len, query.device)
        return _flex_attention()(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True)
    # Query i < recent sees every key j <= i under both masks: reuse the full rows. The other rows
    # go in chunks of `chunk` queries against only the keys they can see (the sinks plus a band
    # of recent + chunk keys), so work and memory grow linearly with the context.
    sink, recent, chunk = state.sink, state.recent, state.chunk
    first = min(recent, q_len)
    outputs = [full[:, :, :first]]
    for start in range(first, q_len, chunk):
        end = min(start + chunk, q_len)
        lo = max(sink, start - recent + 1)  # first non-sink key any query of the chunk sees
        if lo <= sink:
            keys_idx = torch.arange(end, device=query.device)
            k, v = key[:, :, :end], value[:, :, :end]
        else:
            keys_idx = torch.cat(
                [torch.arange(sink, device=query.device), torch.arange(lo, end, device=query.device)]
            )
            k = torch.cat([key[:, :, :sink], key[:, :, lo:end]], dim=2)
            v = torch.cat([value[:, :, :sink], value[:, :, lo:end]], dim=2)
        i = torch.arange(start, end, device=query.device).view(-1, 1)
        j = keys_idx.view(1, -1)
        mask = (j <= i) & ((j < sink) | (i - j < recent))
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end], k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
        )
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else full


def gated_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query ``[B, Hq, T, D]``, key/value ``[B, Hk, S, D]``.

    Returns the attention output as ``[B, T, Hq, D]`` (the layout the model's ``o_proj`` expects)
    and no attention weights.
    """
    state: GateState | None = getattr(module, "_duo_gate_state", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs the {ATTN_IMPLEMENTATION!r} attention but has no gates: "
            "call gate_training.gated_attention.install_gates(model, ...) first"
        )
    state.calls += 1
    if attention_mask is not None:
        raise ValueError(
            "gated attention trains on single unpadded sequences: pass input_ids of shape [1, T] "
            "without an attention_mask"
        )
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"gated attention needs whole sequences (queries {query.shape[2]} != keys "
            f"{key.shape[2]}); call the model with use_cache=False"
        )
    window = kwargs.get("sliding_window")
    if window is not None and window < key.shape[2]:
        raise ValueError(
            f"layer {getattr(module, 'layer_idx', '?')} uses a {window}-token sliding window, "
            f"shorter than this {key.shape[2]}-token sequence; train with --max-context <= {window}"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    full = _full_attention(query, key, value, scale)
    if not state.enabled:
        return full.transpose(1, 2).contiguous(), None

    streaming = _streaming_attention(state, query, key, value, scale, full)
    num_q_heads, num_kv_heads = query.shape[1], key.shape[1]
    alpha = state.gates[module.layer_idx].repeat_interleave(num_q_heads // num_kv_heads)
    alpha = alpha.view(1, -1, 1, 1)
    # Mix in fp32 (the gates' dtype) and return to the model's dtype.
    mixed = streaming.float() + alpha * (full.float() - streaming.float())
    return mixed.to(query.dtype).transpose(1, 2).contiguous(), None


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that own a ``layer_idx`` and the attention projections, in layer order.

    Decoder layers also carry ``layer_idx`` in some models; the attention module is the one with
    a ``q_proj``/``qkv_proj``/``c_attn`` style projection and no attention child of its own.
    """
    found = []
    for module in model.modules():
        if not isinstance(getattr(module, "layer_idx", None), int):
            continue
        has_proj = any(hasattr(module, n) for n in ("q_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv"))
        if has_proj:
            found.append(module)
    return sorted(found, key=lambda m: m.layer_idx)


def install_gates(
    model: torch.nn.Module,
    *,
    sink: int,
    recent: int,
    streaming_impl: str = "sdpa",
    gates: torch.Tensor | None = None,
) -> GateState:
    """Route every attention layer of ``model`` through :func:`gated_attention_forward`.

    Parameters
    ----------
    model : a Hugging Face decoder (``PreTrainedModel``) whose attention modules carry ``layer_idx``
    gates : optional initial gates ``[num_layers, num_kv_heads]``; default all ones (= teacher)

    Returns
    -------
    GateState
        Holds the trainable ``gates`` parameter (fp32, on the model's device).
    """
    from transformers import AttentionInterface

    if streaming_impl not in STREAMING_IMPLS:
        raise ValueError(f"streaming_impl must be one of {STREAMING_IMPLS}, got {streaming_impl!r}")
    config = model.config
    modules = attention_modules(model)
    num_layers = config.num_hidden_layers
    indices = [m.layer_idx for m in modules]
    if not modules or indices != list(range(num_layers)):
        raise ValueError(
            f"{type(model).__name__} has attention modules for layers {indices} but "
            f"num_hidden_layers={num_layers}; only decoders with one attention module per layer "
            "(carrying layer_idx) are supported"
        )
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    device = next(model.parameters()).device
    if gates is None:
        gates = torch.ones(num_layers, num_kv_heads)
    gates = torch.as_tensor(gates, dtype=torch.float32).to(device)
    if tuple(gates.shape) != (num_layers, num_kv_heads):
        raise ValueError(f"gates must have shape ({num_layers}, {num_kv_heads}), got {tuple(gates.shape)}")
    state = GateState(
        gates=torch.nn.Parameter(gates.clone()), sink=sink, recent=recent, streaming_impl=streaming_impl
    )
    AttentionInterface.register(ATTN_IMPLEMENTATION, gated_attention_forward)
    for module in modules:
        # object.__setattr__: a plain attribute, not a registered submodule or parameter.
        object.__setattr__(module, "_duo_gate_state", state)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return state
