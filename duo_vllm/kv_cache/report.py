"""What DUO's KV layout costs for a loaded model and pattern, against stock full attention.

Used for the start-up log line and by ``python -m duo_vllm.kv_cache.report``. The figures are
per tensor-parallel rank and follow vLLM's own planner: a request of ``context_len`` tokens
takes ``ceil(context_len / block_size)`` retrieval blocks plus the streaming group's fixed
blocks, and every block costs the larger of the two groups' pages summed over layers.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from vllm.utils.math_utils import cdiv

from duo_vllm.kv_cache.spec import DuoStreamingSpec, planned_streaming_block_size, streaming_block_size
from duo_vllm.runtime import runtime_from_vllm_config


@dataclass(frozen=True)
class KVReport:
    context_len: int
    block_size: int
    streaming_block_size: int
    stock_bytes_per_token: int
    retrieval_bytes_per_token: int
    streaming_bytes_per_request: int  # sink + recent tokens of every streaming head, exactly
    streaming_blocks_per_request: int  # what the block pool holds for them between steps
    bytes_per_block: int
    tp_padding_head_slots: int
    theoretical_ratio: float  # stock bytes / DUO bytes for one request of context_len, unpaged
    planned_ratio: float  # the same with vLLM's blocks: what its capacity figure shows
    # Which head map these figures are for: a report read later must name it exactly.
    pattern_source: str | None = None
    pattern_format: str | None = None  # duo-vllm-json, duoattention-tsv, prulong-masks-tsv
    pattern_sha256: str | None = None  # first 12 hex digits of the file's sha256

    def line(self) -> str:
        mib = 1024 * 1024
        return (
            f"DUO KV cache: retrieval heads {self.retrieval_bytes_per_token:,} B/token "
            f"(stock {self.stock_bytes_per_token:,} B/token); streaming heads "
            f"{self.streaming_bytes_per_request / mib:.2f} MiB fixed per request "
            f"({self.streaming_blocks_per_request} blocks of {self.streaming_block_size} tokens); "
            f"capacity vs stock at {self.context_len:,} tokens: {self.planned_ratio:.2f}x "
            f"(pattern's bound {self.theoretical_ratio:.2f}x); "
            f"TP padding {self.tp_padding_head_slots} head slots; "
            f"pattern {self.pattern_format or 'in memory'}"
            f"{f' sha256 {self.pattern_sha256}' if self.pattern_sha256 else ''}"
        )


def kv_report(vllm_config, context_len: int | None = None, runtime=None,
              block_size: int | None = None) -> KVReport:
    runtime = runtime or runtime_from_vllm_config(vllm_config)
    pattern = runtime.pattern  # None in unit tests that give a mask alone
    model_config = vllm_config.model_config
    context_len = context_len or model_config.max_model_len
    slots = runtime.head_slots
    head_bytes = _bytes_per_head_token(vllm_config)
    num_layers = len(slots.retrieval)
    retrieval_heads, streaming_heads = int(slots.retrieval.sum()), int(slots.streaming.sum())
    if block_size is None:  # the engine's own layout: the value its layer specs use
        block_size = vllm_config.cache_config.block_size
        s_block = planned_streaming_block_size(runtime, vllm_config)
    else:  # what another retrieval block size would give
        s_block = streaming_block_size(block_size, retrieval_heads, streaming_heads, sink=runtime.sink,
                                       recent=runtime.recent, max_model_len=model_config.max_model_len)
    spec = DuoStreamingSpec(block_size=s_block, num_kv_heads=1, head_size=1, dtype=model_config.dtype,
                            sink=runtime.sink, recent=runtime.recent)
    s_blocks = spec.max_blocks_per_request(model_config.max_model_len) if streaming_heads else 0
    r_blocks = cdiv(context_len, block_size) if retrieval_heads else 0
    bytes_per_block = max(retrieval_heads * block_size, streaming_heads * s_block) * head_bytes
    stock_per_token = num_layers * slots.local_kv_heads * head_bytes
    streaming_exact = streaming_heads * min(context_len, runtime.sink + runtime.recent) * head_bytes
    duo_exact = retrieval_heads * head_bytes * context_len + streaming_exact
    stock_paged = cdiv(context_len, block_size) * block_size * stock_per_token
    return KVReport(
        context_len=context_len,
        block_size=block_size,
        streaming_block_size=s_block,
        stock_bytes_per_token=stock_per_token,
        retrieval_bytes_per_token=retrieval_heads * head_bytes,
        streaming_bytes_per_request=streaming_exact,
        streaming_blocks_per_request=s_blocks,
        bytes_per_block=bytes_per_block,
        tp_padding_head_slots=slots.padding,
        theoretical_ratio=stock_per_token * context_len / duo_exact,
        planned_ratio=stock_paged / ((r_blocks + s_blocks) * bytes_per_block),
        pattern_source=getattr(pattern, "source", None),
        pattern_format=getattr(pattern, "source_format", None),
        pattern_sha256=getattr(pattern, "content_hash", None),
    )


def _bytes_per_head_token(vllm_config) -> int:
    """Bytes of K plus V for one head and one token in the KV cache's dtype."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE, get_dtype_size

    model_config = vllm_config.model_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = model_config.dtype if cache_dtype == "auto" else STR_DTYPE_TO_TORCH_DTYPE[cache_dtype]
    head = model_config.get_head_size()
    return 2 * head * get_dtype_size(dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m duo_vllm.kv_cache.report",
        description="KV bytes of DUO for a model and pattern versus stock vLLM (no engine starts).")
    parser.add_argument("model")
    parser.add_argument("--duo", default="{}", help='DUO options as JSON, e.g. \'{"sparsity": 0.5}\'')
    parser.add_argument("--context-length", type=int, default=None,
                        help="request length to compare at (default: the model's max length)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        duo_options = json.loads(args.duo)
    except json.JSONDecodeError as error:
        parser.error(f"--duo is not valid JSON ({error}); pass an object such as '{{\"sparsity\": 0.5}}'")
    if not isinstance(duo_options, dict):
        parser.error("--duo must be a JSON object of DUO options, such as '{\"sparsity\": 0.5}'")

    import duo_vllm
    from vllm.engine.arg_utils import EngineArgs

    duo_vllm.register()
    engine_args = EngineArgs(
        model=args.model, attention_backend="DUO", dtype=args.dtype, skip_tokenizer_init=True,
        max_model_len=args.max_model_len, block_size=args.block_size,
        tensor_parallel_size=args.tensor_parallel_size,
        additional_config={"duo": duo_options})
    try:
        vllm_config = engine_args.create_engine_config()
    except ValueError as error:  # PatternError and vLLM's own configuration errors
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    report = kv_report(vllm_config, args.context_length)
    print(json.dumps(asdict(report), indent=2) if args.json else report.line())


if __name__ == "__main__":
    main()
