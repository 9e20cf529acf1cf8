"""Which local query/KV heads of one attention layer are retrieval and which stream."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from duo_vllm.pattern import PatternError

# Set on every DUO attention implementation: how model- and cache-level code recognises a DUO layer
# without importing the backends (which import it).
DUO_IMPL_MARKER = "is_duo_impl"


def is_duo_layer(layer) -> bool:
    """Whether ``layer`` (a vLLM ``Attention`` module) runs a DUO implementation."""
    return bool(getattr(getattr(layer, "impl", None), DUO_IMPL_MARKER, False))


@dataclass(frozen=True)
class HeadPlan:
    layer_index: int
    retrieval_kv: torch.Tensor  # bool [local KV heads]
    streaming_kv_heads: torch.Tensor  # long, local KV head indices
    streaming_q_heads: torch.Tensor  # long, local query head indices (GQA groups of those KV heads)
    retrieval_kv_heads: torch.Tensor  # long, local KV head indices
    retrieval_q_heads: torch.Tensor  # long, local query head indices
    # The retrieval heads are local heads [0, R) (``duo_vllm.head_order``): kernels take them as
    # a slice of the layer's query and output. A host bool: read at every step, never synced.
    retrieval_first: bool = False

    @property
    def any_retrieval(self) -> bool:
        return self.retrieval_kv_heads.numel() > 0

    @property
    def any_streaming(self) -> bool:
        return self.streaming_kv_heads.numel() > 0

    @property
    def all_retrieval(self) -> bool:
        return not self.any_streaming

    def to(self, device) -> "HeadPlan":
        """The same plan with its index tensors on ``device`` (kernels index with them)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


def layer_index_from_name(layer_name: str) -> int:
    """Decoder-layer index of an attention module name like ``model.layers.7.self_attn.attn``."""
    numbers = [int(part) for part in layer_name.split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise PatternError(
            f"Cannot tell the decoder layer of attention module {layer_name!r}: DUO supports "
            "decoder-only models with one attention module per layer."
        )
    return numbers[0]


def plan_for_layer(runtime, layer_name: str, num_q_heads: int, num_kv_heads: int,
                   heads_reordered: bool = False) -> HeadPlan:
    """The plan of a layer in the checkpoint's head order, or, once ``duo_vllm.head_order``
    has reordered the layer's weights (``heads_reordered``), with its retrieval heads first."""
    index = layer_index_from_name(layer_name)
    retrieval = torch.from_numpy(runtime.local_retrieval_kv_heads(index).copy())
    if heads_reordered:
        retrieval = torch.sort(retrieval.to(torch.int8), descending=True, stable=True).values.bool()
    if retrieval.numel() != num_kv_heads:
        raise PatternError(
            f"Layer {layer_name} has {num_kv_heads} local KV heads but the pattern gives "
            f"{retrieval.numel()} for this rank; the pattern does not fit this model."
        )
    group = num_q_heads // num_kv_heads
    def query_heads(kv_heads: torch.Tensor) -> torch.Tensor:
        return (kv_heads[:, None] * group + torch.arange(group, device="cpu")[None, :]).flatten()

    streaming_kv = torch.nonzero(~retrieval).flatten()
    retrieval_kv = torch.nonzero(retrieval).flatten()
    r = retrieval_kv.numel()
    return HeadPlan(index, retrieval, streaming_kv, query_heads(streaming_kv),
                    retrieval_kv, query_heads(retrieval_kv),
                    retrieval_first=bool(r) and bool(retrieval[:r].all()))
