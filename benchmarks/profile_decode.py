"""Where a batch-1 decode step spends GPU time, kernel by kernel: stock FLASH_ATTN against DUO.

``duo_speed.py`` measures DUO's decode at 128K about 0.7 ms per token slower than its bandwidth
model predicts (docs/STATUS.md); this attributes the GPU time of the decode steps to kernel
families (GEMMs, FA3, DUO's streaming kernel and KV store, index copies for the retrieval-head
gather/scatter, norms, rotary, sampling, other) so the next optimisation targets what is really
there. The engines run in-process with torch's profiler around a few decode steps (CUDA graphs
off, so every kernel is visible; summed kernel time is what graphs cannot remove) over decode
steps only (the profiler starts once the prefill has produced the first token). Same shapes and
patterns as duo_speed.py, dummy weights.

    python benchmarks/profile_decode.py --case llama3-8b-gqa-50 --patterns PATTERNS --context 131072 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the profiler sees the worker's kernels
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
sys.path.insert(0, str(Path(__file__).parent))

from duo_speed import CASES  # noqa: E402
from kv_capacity import engine_kwargs, model_dir, synthetic_prompt  # noqa: E402

# kernel-name pattern -> family; first match wins (names as CUDA/Triton report them)
FAMILIES = [
    ("duo streaming (Triton)", r"lambda|_streaming"),
    ("duo kv store (Triton)", r"store_kv"),
    ("attention (FA3/FA2)", r"flash|fmha"),
    ("kv cache write", r"reshape_and_cache|cache_kernel"),
    ("index gather/scatter", r"index|gather|scatter|indexing"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|matmul|splitK"),
    ("norm", r"rms|norm"),
    ("rotary", r"rotary|rope"),
    ("activation", r"silu|act_and_mul|gelu"),
    ("copy/elementwise", r"copy|elementwise|fill|memcpy|Memcpy|Memset|vectorized"),
    ("sampling/softmax", r"softmax|argmax|sample|topk|sort|reduce"),
]


def family(name: str) -> str:
    return next((f for f, pattern in FAMILIES if re.search(pattern, name, re.IGNORECASE)), "other")


def profile(model: str, case: dict, duo: dict | None, context: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(model, context + steps + 64, 0.9, duo, enforce_eager=True,
                              enable_prefix_caching=False, max_num_seqs=4,
                              distributed_executor_backend="uni"))  # the model runs in this process
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True, detokenize=False)
    llm.generate([synthetic_prompt(2048)], params, use_tqdm=False)  # warm-up
    engine.add_request("profiled", synthetic_prompt(context), params)
    for _ in range(100_000):  # the (chunked) prefill, until it has produced the first token
        if any(out.outputs and out.outputs[0].token_ids for out in engine.step()):
            break
    cuda = torch.cuda.is_available()  # (CPU: the same flow over CPU ops, for a smoke test)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):  # decode steps only: one new token each
            engine.step()
        sync()
    while engine.has_unfinished_requests():
        engine.step()
    per_family: dict[str, float] = {}
    for event in prof.key_averages():
        total_us = event.device_time_total if cuda else event.self_cpu_time_total
        if total_us:
            key = family(event.key)
            per_family[key] = per_family.get(key, 0.0) + total_us
    llm.llm_engine.engine_core.shutdown(timeout=60)
    ms = {k: round(v / steps / 1e3, 4) for k, v in sorted(per_family.items(), key=lambda kv: -kv[1])}
    return {"ms_per_decode_token_by_family": ms, "total_ms": round(sum(ms.values()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--patterns", required=True, help="folder with the published DuoAttention patterns")
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    import torch

    case = CASES[args.case]
    model = model_dir(case["config"])
    duo = {"pattern": str(Path(args.patterns) / case["pattern"]), "sparsity": case["sparsity"]}
    result = {"device": torch.cuda.get_device_name(0), "case": args.case, "context": args.context,
              "command": f"python benchmarks/profile_decode.py --case {args.case} --patterns PATTERNS "
                         f"--context {args.context}",
              "stock": profile(model, case, None, args.context, args.steps),
              "duo": profile(model, case, duo, args.context, args.steps)}
    out = Path(args.out) / f"profile_decode_{args.case}_{args.context}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    families = sorted(set(result["stock"]["ms_per_decode_token_by_family"]) | set(result["duo"]["ms_per_decode_token_by_family"]))
    print(f"{args.case} at {args.context} tokens on {result['device']}: GPU ms per decode token (eager)")
    print(f"{'family':<26}{'stock':>9}{'DUO':>9}")
    for f in families:
        print(f"{f:<26}{result['stock']['ms_per_decode_token_by_family'].get(f, 0):>9.3f}"
              f"{result['duo']['ms_per_decode_token_by_family'].get(f, 0):>9.3f}")
    print(f"{'total':<26}{result['stock']['total_ms']:>9.3f}{result['duo']['total_ms']:>9.3f}")


if __name__ == "__main__":
    main()
