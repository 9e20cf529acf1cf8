"""Where a batch-1 decode step spends GPU time, kernel by kernel: stock FLASH_ATTN against DUO.

``duo_speed.py`` measures DUO's decode above its bandwidth floor (H200, 128K: 7.2 against 5.1 ms
per token; docs/STATUS.md); this attributes the GPU time of the decode steps to kernel
families (GEMMs, FA3, DUO's streaming kernel and KV store, index copies for the retrieval-head
gather/scatter, norms, rotary, sampling, other) so the next optimisation targets what is really
there. Each engine runs in a spawned process of its own, stepped by hand there, so that vLLM's
own worker profiler (``profiler_config``: torch's profiler in the worker) records exactly the decode steps: it starts
once the prefill has produced the first token and stops after ``--steps`` more, each of which must
add one token (checked). By default CUDA graphs are off, so every kernel is visible; summed kernel time is
what graphs cannot remove. ``--cuda-graphs`` profiles decode steps replayed from vLLM's graphs
instead (what serving runs; ``results/profile_decode_h200_*_graphs.json``). Either way the
same number of decode steps is first timed without the profiler (``wall_ms_per_step_unprofiled``:
kernels, launches or replays, scheduling, sampling), to set against the kernel sum. The kernels
are read from the trace the profiler writes. Same shapes and patterns as duo_speed.py, dummy
weights. On a GPU the JSON also holds the HBM floors of the families that stream memory
(``decode_floors``: weights for the GEMMs, the K/V each engine's attention reads), to put each
family's time next to its floor.

``--backends`` takes duo_speed's engine names (``stock,duo,duo-overlap``..., ``_common.BACKENDS``). The
PNG stacks each engine's families with its wall time per step.

    python benchmarks/profile_decode.py --case llama3-8b-gqa-50 --patterns PATTERNS --context 131072 --out $OUT
    python benchmarks/profile_decode.py --plot benchmarks/results/FILE.json   # PNG, locally
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import (  # noqa: E402
    BACKENDS,
    CASES,
    DeviceFloors,
    case_pattern,
    device_floors,
    duo_report,
    engine_kwargs,
    model_dir,
    parameters,
    parse_backends,
    set_engine_environment,
    synthetic_prompt,
)

set_engine_environment(VLLM_ENABLE_V1_MULTIPROCESSING="0")  # before vLLM is imported; engine.step() runs one step here
from _plots import marks, save_png, subplots  # noqa: E402

# kernel-name pattern -> family; first match wins (names as CUDA/Triton report them)
FAMILIES = [
    ("duo streaming (Triton)", r"lambda|_streaming|merge_splits"),
    ("duo kv store (Triton)", r"store_kv"),
    ("kv cache write", r"reshape_and_cache|cache_kernel"),  # before attention: "..._flash_kernel"
    ("attention (FA3/FA2)", r"flash|fmha"),
    ("index gather/scatter", r"index|gather|scatter|indexing"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|matmul|splitK"),
    ("norm", r"rms|norm|_typeConvert"),  # vLLM's fused_add_rms_norm kernel is named by its template
    ("rotary", r"rotary|rope"),
    ("activation", r"silu|act_and_mul|gelu"),
    ("copy/elementwise", r"copy|elementwise|fill|memcpy|Memcpy|Memset|vectorized"),
    ("sampling/softmax", r"softmax|argmax|sample|topk|sort|reduce"),
]


def family(name: str) -> str:
    return next((f for f, pattern in FAMILIES if re.search(pattern, name, re.IGNORECASE)), "other")


def profile(model: str, case: dict, duo: dict | None, context: int, steps: int,
            cuda_graphs: bool = False) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    trace_dir = tempfile.mkdtemp(prefix="duo-profile-")
    profiler = {"profiler": "torch", "torch_profiler_dir": trace_dir, "torch_profiler_with_stack": False,
                "torch_profiler_use_gzip": True, "ignore_frontend": True}
    graphs = ({"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4]}} if cuda_graphs
              else {"enforce_eager": True})
    # 0.8, as in the runs in results/ (when engines shared one process, graph pools held 15 GiB).
    llm = LLM(**engine_kwargs(model, context + 2 * steps + 64, 0.8, duo, enable_prefix_caching=False,
                              max_num_seqs=4, profiler_config=profiler, distributed_executor_backend="uni",
                              **graphs))
    engine = llm.llm_engine

    def params():  # LLM.generate turns its params to FINAL_ONLY; each step must report its token here
        return SamplingParams(max_tokens=2 * steps + 4, temperature=0, ignore_eos=True, detokenize=False,
                              output_kind=RequestOutputKind.CUMULATIVE)

    def decode_steps(last: int) -> int:  # one new token each
        for _ in range(steps):
            last = max([len(out.outputs[0].token_ids) for out in engine.step() if out.outputs] or [last])
        return last

    llm.generate([synthetic_prompt(2048)], params(), use_tqdm=False)  # warm-up
    engine.add_request("profiled", synthetic_prompt(context), params())
    generated = 0
    while generated == 0 and engine.has_unfinished_requests():  # the (chunked) prefill: first token
        generated = max([len(out.outputs[0].token_ids) for out in engine.step() if out.outputs] or [0])
    # Wall time of the same decode steps without the profiler: what a step costs end to end
    # (kernels, launches or graph replays, scheduling, sampling), to set against the kernel sum.
    start = time.perf_counter()
    generated = decode_steps(generated)
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    llm.start_profile()
    last = decode_steps(generated)
    llm.stop_profile()  # the worker writes its trace before this returns
    while engine.has_unfinished_requests():
        engine.step()
    if not 0 < last - generated <= steps:
        raise SystemExit(f"the profiled window held {last - generated} new tokens for {steps} steps: "
                         "it did not cover the decode steps")
    llm.llm_engine.engine_core.shutdown(timeout=60)
    per_kernel = kernel_times_us(trace_dir, cuda=torch.cuda.is_available())
    ms = {}
    for name, total_us in per_kernel.items():
        ms[family(name)] = ms.get(family(name), 0.0) + total_us / steps / 1e3
    ms = {k: round(v, 4) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {"decode_tokens_profiled": last - generated, "wall_ms_per_step_unprofiled": round(wall_ms, 3),
            "ms_per_decode_token_by_family": ms, "total_ms": round(sum(ms.values()), 3),
            "top_kernels_ms_per_token": {name[:160]: round(us / steps / 1e3, 4) for name, us in top}}


def decode_floors(config: dict, report: dict, context: int, device: DeviceFloors) -> dict:
    """HBM floors (bytes / bandwidth) of the families that stream memory: GEMMs read every
    weight once per token, attention every cached K/V it attends to."""
    def ms(num_bytes: float) -> float:
        return round(num_bytes / device.bandwidth * 1e3, 3)

    return {"bandwidth_bytes_per_s": device.bandwidth,
            "gemm_weights_ms": ms(2 * parameters(config)),
            "stock_attention_kv_ms": ms(report["stock_bytes_per_token"] * context),
            "duo_retrieval_kv_ms": ms(report["retrieval_bytes_per_token"] * context),
            "duo_streaming_kv_ms": ms(report["streaming_bytes_per_request"])}


TOP_KERNELS = 25
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def kernel_times_us(trace_dir: str, cuda: bool) -> dict[str, float]:
    """Microseconds per kernel name, summed over the worker traces under ``trace_dir``: every
    kernel, copy and memset the GPU ran. On a CPU machine (a smoke run of the flow) the trace
    holds no device events, so the CPU ops stand in (nested, so their times overlap), flagged as
    such by the caller."""
    traces = sorted(Path(trace_dir).rglob("*.pt.trace.json*"))
    if not traces:
        raise SystemExit(f"vLLM's profiler wrote no trace under {trace_dir}: is profiler_config supported here?")
    totals: dict[str, float] = {}
    for path in traces:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        for event in events:
            wanted = event.get("cat") in DEVICE_CATEGORIES if cuda else event.get("cat") == "cpu_op"
            if wanted and "dur" in event:
                totals[event["name"]] = totals.get(event["name"], 0.0) + float(event["dur"])
    if cuda and not totals:
        raise SystemExit(f"vLLM's profiler traces ({', '.join(map(str, traces))}) hold no GPU kernel: "
                         "CUPTI recorded nothing (is the nvidia-cuda-cupti wheel matching torch installed?)")
    return totals


def profile_in_child(*args) -> dict:
    """``profile`` in a fresh process: an engine's KV cache and CUDA-graph pools are not all
    returned when it shuts down (H200, engines in one process at 0.8 of memory: the third found
    15.8 GiB of 139.8 free), so each engine gets a process of its own and starts on an empty GPU."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(profile, *args).result()


PLOT_GROUPS = [("attention (FA3/FA2)", "FA3"), ("duo streaming (Triton)", "DUO streaming"), ("gemm", "GEMMs")]


def profiled_engines(results: dict) -> list[tuple[str, dict]]:
    """(label, profile) of every engine in a result file: one run's backends, or those of each of
    its ``runs`` (A/B files made of several calls)."""
    runs = results.get("runs", [results])
    return [(f"{key}" + (f" #{i + 1}" if len(runs) > 1 else ""), run[key])
            for i, run in enumerate(runs) for key in run if isinstance(run[key], dict) and "total_ms" in run[key]]


def plot(json_path: str) -> Path:
    """PNG next to the JSON: each engine's GPU ms per decode token, stacked by kernel family, and
    its unprofiled wall time per step (needs .[bench])."""
    results = json.loads(Path(json_path).read_text())
    engines = profiled_engines(results)
    fig, ax = subplots(figsize=(3.4 + 1.1 * len(engines), 4))
    xs = list(range(len(engines)))
    bottom = [0.0] * len(engines)
    for family_name, label in PLOT_GROUPS + [(None, "rest")]:
        heights = [(r["ms_per_decode_token_by_family"].get(family_name, 0.0) if family_name else
                    r["total_ms"] - sum(r["ms_per_decode_token_by_family"].get(f, 0.0) for f, _ in PLOT_GROUPS))
                   for _, r in engines]
        ax.bar(xs, heights, 0.6, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    marks(ax, xs, [r["wall_ms_per_step_unprofiled"] for _, r in engines], 26, label="wall per step (unprofiled)")
    ax.set_xticks(xs, [name for name, _ in engines], fontsize=7, rotation=20)
    ax.set_ylabel("ms per decode token")
    ax.set_title(f"{results['case']} at {results['context']} tokens, {results['mode']}, "
                 f"{results['device'].split(' (')[0]}", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_png(fig, json_path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result file")
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--patterns", help="folder with the published DuoAttention patterns")
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="decode replaying vLLM's CUDA graphs (default: eager, every kernel launched)")
    parser.add_argument("--backends", default="stock,duo",
                        help="comma-separated engines to profile, from duo_speed's: "
                             "stock, duo, duo-gather, duo-overlap")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    if not args.case or (CASES[args.case]["pattern"] and not args.patterns):
        parser.error("--case and --patterns are required (or --plot FILE.json)")
    backends = parse_backends(parser, args.backends)
    import torch

    case = CASES[args.case]
    model = model_dir(case["config"])
    duo = {"pattern": case_pattern(case["pattern"], case["config"], case["sparsity"], args.patterns),
           "sparsity": case["sparsity"]}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"device": device, "case": args.case, "context": args.context,
              "mode": "CUDA graphs" if args.cuda_graphs else "eager",
              "command": f"python benchmarks/profile_decode.py --case {args.case} --patterns PATTERNS "
                         f"--context {args.context} --steps {args.steps}"
                         + (" --cuda-graphs" if args.cuda_graphs else "")
                         + (f" --backends {args.backends}" if backends != ["stock", "duo"] else "")}
    suffix = ("_graphs" if args.cuda_graphs else "") + ("" if backends == ["stock", "duo"] else "_" + "_".join(backends))
    out = Path(args.out) / f"profile_decode_{args.case}_{args.context}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for backend in backends:  # written after each engine: a cut-short run keeps what it measured
        result[backend] = profile_in_child(model, case, BACKENDS[backend](duo), args.context, args.steps,
                                           args.cuda_graphs)
        out.write_text(json.dumps(result, indent=2))
    if torch.cuda.is_available():
        floors_of_device = device_floors(device)  # an unlisted GPU stops here (its profiles already written)
        report = duo_report(engine_kwargs(model, args.context + 2 * args.steps + 64, 0.9, duo))
        result["floors"] = decode_floors(case["config"], report, args.context, floors_of_device)
    out.write_text(json.dumps(result, indent=2))
    try:
        print("plot:", plot(str(out)))
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install '.[bench]')")
    families = sorted(set().union(*(result[b]["ms_per_decode_token_by_family"] for b in backends)))
    what = (f"GPU ms per decode token ({result['mode']})" if torch.cuda.is_available()
            else "CPU smoke run: ms of nested ops")
    print(f"{args.case} at {args.context} tokens on {result['device']}: {what}")
    print(f"{'family':<26}" + "".join(f"{b:>11}" for b in backends))
    for f in families:
        print(f"{f:<26}" + "".join(f"{result[b]['ms_per_decode_token_by_family'].get(f, 0):>11.3f}" for b in backends))
    print(f"{'total':<26}" + "".join(f"{result[b]['total_ms']:>11.3f}" for b in backends))
    print(f"{'wall per step, unprofiled':<26}" + "".join(f"{result[b]['wall_ms_per_step_unprofiled']:>11.3f}"
                                                          for b in backends))
    if "floors" in result:
        print("floors (ms):", ", ".join(f"{k} {v}" for k, v in result["floors"].items() if k.endswith("_ms")))


if __name__ == "__main__":
    main()
