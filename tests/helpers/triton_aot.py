"""Compile the CUDA path's Triton kernels for real GPU targets on a machine without a GPU.

The interpreter tests check what the kernels compute; this checks that the GPU compiler accepts
them (shapes, dtypes, constexpr branches), which no CPU-only CI would otherwise see before a GPU
run. The wrappers in ``duo_vllm.ops.triton_streaming`` are called for real with small CPU
tensors while every kernel is replaced by a recorder, so the compiled configurations are exactly
the ones those wrappers launch; each recorded launch is then compiled with Triton's own
ahead-of-time path (``triton.compile``, ``ptxas`` from the triton wheel) for each target.

Run in a process where ``TRITON_INTERPRET`` is unset (the test suite's conftest sets it):
``python -m tests.helpers.triton_aot [--shard I/N]``. Prints one line per compiled launch, exits
non-zero on the first failure. ``--shard I/N`` compiles every N-th distinct configuration from the
I-th: N such processes side by side cover them all (compiling is single-threaded).
"""

from __future__ import annotations

import os
import sys

TARGETS = [("cuda", 90, 32), ("cuda", 80, 32)]  # Hopper (H100/H200), Ampere (A100)
TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int32": "i32", "int64": "i64",
                   "float8_e4m3fn": "fp8e4nv"}
# FP8 KV caches run only where FlashAttention 3 reads them (Hopper): compiled for sm_90 only.
FP8_TARGETS = [("cuda", 90, 32)]


class Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **constexprs)`` is recorded."""

    def __init__(self, fn, launches: list) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launches.append((self.fn, args, constexprs))


def signature(fn, args, constexprs) -> tuple[dict, dict]:
    import torch

    types, values = {}, {}
    for name, arg in zip(fn.arg_names, args):
        if isinstance(arg, torch.Tensor):
            types[name] = "*" + TORCH_TO_TRITON[str(arg.dtype).removeprefix("torch.")]
        elif isinstance(arg, bool) or not isinstance(arg, (int, float)):
            raise TypeError(f"{fn.__name__}: argument {name} = {arg!r} has no Triton type here")
        elif isinstance(arg, int):
            types[name] = "i32" if -2**31 <= arg < 2**31 else "i64"
        else:
            types[name] = "fp32"
    for name, value in constexprs.items():
        types[name] = "constexpr"
        values[(fn.arg_names.index(name),)] = value
    missing = [n for n in fn.arg_names if n not in types]
    if missing:
        raise TypeError(f"{fn.__name__}: launch left out {missing}")
    return types, values


def record_into(kernels, launches: list) -> None:
    """Replace every kernel of ``kernels`` by a recorder appending to ``launches``."""
    for name in ("_lambda_paged_attention_kernel", "_lambda_decode_split_kernel", "_merge_splits_kernel",
                 "_store_kv_kernel"):
        kernel = getattr(kernels, name)
        setattr(kernels, name, Recorder(getattr(kernel, "fn", kernel) if isinstance(kernel, Recorder) else kernel,
                                        launches))


def paged_inputs(num_kv: int, group: int, d: int, dtype, cache_dtype):
    """A small batch for the attention wrappers: query (half its heads streaming), paged cache,
    (block table, query starts, sequence lengths, streaming query heads) and the common options.
    Requests: a decode at 300 tokens, one at 40, and a CUDA-graph padding request."""
    import torch

    num_q = num_kv * group
    query = torch.zeros(8, 2 * num_q, d, dtype=dtype)
    cache = torch.zeros(6, num_kv + 1, 16, 2 * d, dtype=cache_dtype)
    batch = (torch.zeros(3, 4, dtype=torch.int32), torch.tensor([0, 1, 2, 2], dtype=torch.int32),
             torch.tensor([300, 40, 0], dtype=torch.int32), torch.arange(num_q) * 2)
    return query, cache, batch, dict(num_kv_heads=num_kv, sink=64, recent=256, scale=d ** -0.5)


def record_launches() -> list:
    """Every launch the wrappers make for a spread of real configurations."""
    import torch

    import duo_vllm.ops.triton_streaming as kernels

    launches: list = []
    record_into(kernels, launches)

    # The dtypes a GPU runs them in: DUO's CUDA backend is FLASH_ATTN's, which serves fp16 and bf16
    # only (float32 models are refused before any layer is built), so no fp32 launch ever reaches
    # the compiler. fp16 takes bf16's code path: one shape of it suffices.
    # (KV heads, GQA group, head size): Llama-3 GQA, MHA, a group of 5, a head size of 80
    shapes = ((4, 4, 128), (24, 1, 128), (2, 5, 64), (3, 2, 80))
    for dtype, dtype_shapes in ((torch.bfloat16, shapes), (torch.float16, shapes[:1])):
        for num_kv, group, d in dtype_shapes:
            query, cache, batch, common = paged_inputs(num_kv, group, d, dtype, dtype)
            for max_query_len, splits in ((1, 1), (1, 10), (1, 3), (6, None)):  # decode, split decode, prefill
                kernels.lambda_paged_attention(query, torch.empty_like(query), cache, *batch[:3], max_query_len,
                                               batch[3], num_splits=splits, **common)
            key = torch.zeros(8, 2 * num_kv, d, dtype=dtype)
            slots = torch.zeros(8, dtype=torch.int64)
            retrieval, streaming = torch.arange(num_kv), torch.arange(num_kv, 2 * num_kv)
            kernels.store_kv_heads(key, key, [(retrieval, cache, slots), (streaming, cache, slots)])
            kernels.store_kv_heads(key, key, [(retrieval[:0], cache, slots), (streaming, cache, slots)])
    return launches


def record_fp8_launches() -> list:
    """The launches of an FP8 KV cache (--kv-cache-dtype fp8): FP8 query and pages, bf16 output."""
    import torch

    import duo_vllm.ops.triton_streaming as kernels

    launches: list = []
    record_into(kernels, launches)
    fp8 = torch.float8_e4m3fn
    scale = torch.ones(1, dtype=torch.float32)
    scales = dict(q_scale=scale, k_scale=scale, v_scale=scale)
    for num_kv, group, d in ((4, 4, 128), (24, 1, 128)):
        query, cache, batch, common = paged_inputs(num_kv, group, d, torch.bfloat16, fp8)
        for q in (query.to(fp8), query):  # vLLM's FP8 query (FA3), or the model's dtype
            for max_query_len, splits in ((1, 1), (1, 10), (6, None)):
                kernels.lambda_paged_attention(q, torch.empty_like(query), cache, *batch[:3], max_query_len,
                                               batch[3], num_splits=splits, **common,
                                               **(scales if q.dtype == fp8 else dict(k_scale=scale, v_scale=scale)))
        key = torch.zeros(8, 2 * num_kv, d, dtype=torch.bfloat16)
        slots = torch.zeros(8, dtype=torch.int64)
        retrieval, streaming = torch.arange(num_kv), torch.arange(num_kv, 2 * num_kv)
        kernels.store_kv_heads(key, key, [(retrieval, cache, slots), (streaming, cache, slots)],
                               k_scale=scale, v_scale=scale)
    return launches


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shard, shards = (int(x) for x in argv[1].split("/")) if argv[:1] == ["--shard"] else (0, 1)
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the kernels must be real @triton.jit functions to compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen = set()
    launches = [(launch, TARGETS) for launch in record_launches()]
    launches += [(launch, FP8_TARGETS) for launch in record_fp8_launches()]
    for (fn, args, constexprs), targets in launches:
        types, values = signature(fn, args, constexprs)
        key = (fn.__name__, tuple(sorted(types.items())), tuple(sorted(map(str, values.items()))))
        if key in seen:
            continue
        seen.add(key)
        if (len(seen) - 1) % shards != shard:
            continue
        for backend, arch, warp in targets:
            compiled = triton.compile(ASTSource(fn=fn, signature=types, constexprs=values),
                                      target=GPUTarget(backend, arch, warp))
            consts = ", ".join(f"{fn.arg_names[i[0]]}={v}" for i, v in values.items())
            print(f"sm_{arch} {fn.__name__} [{consts}]: {len(compiled.asm['cubin'])} B cubin", flush=True)
    print(f"compiled shard {shard}/{shards} of {len(seen)} launch configurations for {len(TARGETS)} targets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
