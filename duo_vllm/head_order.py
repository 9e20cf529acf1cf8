"""Retrieval heads first: each DUO layer's attention weights reordered once, at load.

A pattern scatters a layer's retrieval heads among its streaming ones, so the attention kernels
would have to gather the retrieval query heads and scatter their output back at every step of
every layer. Attention treats heads independently (one rotary embedding, one per-head norm for
all of them), so permuting the heads of ``qkv_proj``'s output rows and of ``o_proj``'s input
columns the same way gives the same layer output; after that, a layer's retrieval heads are its
first heads and the kernels take them as slices. The permutation is local to each tensor-parallel
rank (a rank's heads are a contiguous block of the checkpoint's heads), so sharding is unchanged.

Layers whose module does not look like that (no ``qkv_proj`` / ``o_proj`` pair, quantized or
wrapped projections, other per-head parameters) keep the checkpoint's order and the per-step
gather (same results); the log says which. Measured on an H200 (``docs/backend.md``), the
gather and scatter cost about 1% of a long-context token: a tidy-up, not a large speed-up.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("vllm.duo_vllm")

REORDERED_FLAG = "duo_heads_reordered"  # set on each Attention layer whose weights were reordered


def checkpoint_order_reason(vllm_config, runtime) -> str | None:
    """Why this engine (``runtime``: its DUO state) must keep the checkpoint's head order, or
    None when it may reorder.

    Raises for weights post-processed by another process (``--load-format ipc_cache``, vLLM's
    weight-cache daemon): whether that process reordered them cannot be told from here.
    """
    from duo_vllm.config import DuoConfigError

    if not runtime.config.reorder_heads:
        return "reorder_heads is false"
    if str(getattr(vllm_config.load_config, "load_format", "")) == "ipc_cache":
        raise DuoConfigError(
            "--load-format ipc_cache maps weights that another process (vllm preload) loaded and "
            "post-processed, and DUO cannot tell whether it reordered their attention heads. Start "
            "both the preload daemon and this engine with --additional-config "
            "'{\"duo\": {\"reorder_heads\": false}}'."
        )
    if vllm_config.lora_config is not None:
        return "LoRA is enabled: adapters are trained on the checkpoint's head order"
    return None


def head_rows(heads: torch.Tensor, head_size: int, offset: int = 0) -> torch.Tensor:
    """Row (or column) indices of ``heads`` in a projection whose heads are ``head_size`` wide."""
    return (offset + heads[:, None] * head_size + torch.arange(head_size)[None, :]).flatten()


def _not_reorderable(attn_module: nn.Module, qkv, o_proj, q_heads: int, kv_heads: int) -> str | None:
    """Why this attention module's heads cannot be reordered safely, or None."""
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear, UnquantizedLinearMethod

    if not isinstance(qkv, QKVParallelLinear) or not isinstance(o_proj, RowParallelLinear):
        return "its projections are not a QKVParallelLinear qkv_proj and a RowParallelLinear o_proj"
    for proj in (qkv, o_proj):
        if not isinstance(proj.quant_method, UnquantizedLinearMethod):
            return f"{type(proj.quant_method).__name__} weights"
    if (qkv.num_heads, qkv.num_kv_heads) != (q_heads, kv_heads):
        return (f"qkv_proj has {qkv.num_heads} query / {qkv.num_kv_heads} KV heads on this rank, "
                f"the attention layer {q_heads} / {kv_heads}")
    # Any other parameter of the attention module might be laid out per head (a norm over all
    # heads' channels, per-head scales): reordering would have to know it. Per-head norms shared
    # by all heads (weight of one head's width, e.g. Qwen3's q_norm / k_norm) are safe.
    for name, param in attn_module.named_parameters():
        owner = name.split(".")[0]
        if owner in ("qkv_proj", "o_proj"):
            continue
        if param.numel() == 1 or (param.dim() == 1 and param.numel() == qkv.head_size):
            continue  # a scalar (e.g. a KV-cache scale) or a norm every head shares
        return f"it has parameter {name!r} of shape {tuple(param.shape)}"
    expected_qkv = (q_heads * qkv.head_size + kv_heads * (qkv.head_size + qkv.v_head_size))
    if qkv.weight.shape[0] != expected_qkv or o_proj.weight.shape[1] != q_heads * qkv.v_head_size:
        return (f"weights of unexpected shape qkv {tuple(qkv.weight.shape)}, o_proj "
                f"{tuple(o_proj.weight.shape)}")
    return None


@torch.no_grad()
def reorder_layer_heads(qkv, o_proj, kv_order: torch.Tensor, group: int) -> None:
    """Permute the heads of one layer in place: new local KV head i is old head ``kv_order[i]``
    (and its ``group`` query heads follow it)."""
    q_order = head_rows(kv_order, group)
    num_q, num_kv = qkv.num_heads, qkv.num_kv_heads
    d, dv = qkv.head_size, qkv.v_head_size
    rows = torch.cat([
        head_rows(q_order, d),
        head_rows(kv_order, d, offset=num_q * d),
        head_rows(kv_order, dv, offset=num_q * d + num_kv * d),
    ])
    for param in (qkv.weight, getattr(qkv, "bias", None)):
        if param is not None:
            # copy_ keeps the parameters' storage (anything holding it sees the new order).
            param.data.copy_(param.data.index_select(0, rows.to(param.device)))
    cols = head_rows(q_order, dv).to(o_proj.weight.device)
    o_proj.weight.data.copy_(o_proj.weight.data.index_select(1, cols))


def reorder_model_heads(model: nn.Module) -> int:
    """Put the retrieval heads first in every DUO attention layer of ``model`` whose heads can be
    reordered, and tell the layer so; returns how many layers this call reordered. Idempotent: a
    layer already reordered is left alone."""
    from duo_vllm.backends.head_plan import is_duo_layer, plan_for_layer

    layers = [m for m in model.modules() if is_duo_layer(m)]
    if not layers:
        return 0
    reason = layers[0].impl.checkpoint_order_reason
    if reason is None and any(getattr(m.impl, "kv_sharing_target_layer_name", None) for m in layers):
        # A layer reading another layer's cache would see that layer's head order.
        reason = "some layers share another layer's KV cache"
    if reason is not None:
        logger.info("DUO: attention heads keep the checkpoint's order (%s)", reason)
        return 0
    skipped: dict[str, list[str]] = {}
    reordered = 0
    for layer in layers:
        impl = layer.impl
        if getattr(layer, REORDERED_FLAG, False):
            continue
        plan = plan_for_layer(impl.runtime, layer.layer_name, impl.num_heads, impl.num_kv_heads)
        if plan.all_retrieval or not plan.any_retrieval or plan.retrieval_first:
            continue  # nothing to gather in this layer
        parent_name = layer.layer_name.rsplit(".", 1)[0]
        try:
            attn_module = model.get_submodule(parent_name)
        except AttributeError:
            skipped.setdefault(f"no module {parent_name!r} in the model", []).append(layer.layer_name)
            continue
        qkv, o_proj = getattr(attn_module, "qkv_proj", None), getattr(attn_module, "o_proj", None)
        why = _not_reorderable(attn_module, qkv, o_proj, impl.num_heads, impl.num_kv_heads)
        if why is not None:
            skipped.setdefault(why, []).append(layer.layer_name)
            continue
        kv_order = torch.cat([plan.retrieval_kv_heads, plan.streaming_kv_heads])
        reorder_layer_heads(qkv, o_proj, kv_order, impl.num_heads // impl.num_kv_heads)
        setattr(layer, REORDERED_FLAG, True)
        impl.forget_head_plan()
        reordered += 1
    if reordered:
        logger.info("DUO: retrieval heads put first in %d attention layers (weights reordered at load)",
                    reordered)
    for why, names in skipped.items():
        logger.warning("DUO: %d attention layers keep the checkpoint's head order (%s; e.g. %s): their "
                       "retrieval heads are gathered at every step (same results)", len(names), why, names[0])
    return reordered


def has_reordered_heads(model: nn.Module) -> bool:
    return any(getattr(module, REORDERED_FLAG, False) for module in model.modules())


def refuse_weight_update(model: nn.Module) -> None:
    """In-place weight updates write the checkpoint's head order; a reordered model would then
    run some layers with the wrong heads, so they are refused, naming the fix."""
    if has_reordered_heads(model):
        raise ValueError(
            "DUO reordered this model's attention heads at load (retrieval heads first), so an "
            "in-place weight update would put weights on the wrong heads. To update weights in "
            "place, serve with --additional-config '{\"duo\": {\"reorder_heads\": false}}' "
            "(same results, with a per-step gather of the retrieval heads)."
        )
