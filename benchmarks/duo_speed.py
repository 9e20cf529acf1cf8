"""DUO against stock FLASH_ATTN on one GPU, same run: time to first token, decode ms/token and
throughput, each next to its floor.

Cases (random weights of the real shapes, ``load_format="dummy"``; the published patterns):
  llama3-8b-gqa-50  Llama-3-8B, Llama-3-8B-Instruct-Gradient-1048k pattern at 50% retrieval:
                    batch-1 TTFT and decode at 32K and 128K; throughput of 128 requests of 2K
                    and of 32 requests of 32K (128 output tokens each).
  llama2-7b-mha-25  Llama-2-7B (MHA), Llama-2-7B-32K-Instruct pattern at 25% retrieval: batch-1
                    TTFT and decode at 32K and 64K (the config's 32K position limit is raised:
                    random weights, so only speed and memory matter).
Both engines use vLLM's defaults (torch.compile, FULL_AND_PIECEWISE CUDA graphs, chunked prefill)
with the same capture sizes (1..256), prefix caching off, greedy, ignore_eos. Batch-1 TTFT and
decode ms/token come from one request each, timed by vLLM's per-request stats (first-token
latency; engine-core time from the first to the last token).

Floors (the device's HBM bandwidth and dense bf16 peak, ``_common.DEVICES``; e.g. H100 SXM 3.35 TB/s and
989 TFLOP/s, H200 4.8 TB/s and 989 TFLOP/s): decode = (weights + KV bytes read per token) /
bandwidth; prefill = (2 x parameters x tokens + attention FLOPs) / peak, where a streaming head's
attention costs sink + recent keys per query; throughput = the same prefill floor for all prompts
plus the decode floor per step at the batch size that fits.

``--longest``: each engine starts with ``--max-model-len -1`` (vLLM's auto-fit, which for DUO
counts what one request needs at its peak) on the shape with its position limit raised, which gives the
longest context each can hold; batch-1 TTFT and decode are then measured at that length (less the
output) when that prefill is expected (1.6x its floor) within ``--longest-budget-s``, else at the
longest context that is: the JSON keeps both (``held_context``, ``context``).

``--backends stock,duo,duo-gather,duo-overlap`` adds DUO engines that differ in one option, batch-1
lengths only: ``duo-gather`` keeps the checkpoint's head order (``"reorder_heads": false``:
retrieval heads gathered at every step), ``duo-overlap`` runs the streaming heads on a second CUDA
stream beside FA3 (``"overlap_streaming": true``) instead of after it.

    python benchmarks/duo_speed.py --case llama3-8b-gqa-50 --patterns PATTERNS --out $OUT
    python benchmarks/duo_speed.py --case llama2-7b-mha-25 --patterns PATTERNS --out $OUT --longest
    python benchmarks/duo_speed.py --case llama3-8b-gqa-50 --patterns PATTERNS --out $OUT \
        --lengths 131072 --skip-throughput --backends stock,duo,duo-gather   # batch 1 at 128K only
    python benchmarks/duo_speed.py --case llama3-8b-gqa-50 --patterns PATTERNS --out $OUT \
        --kv-cache-dtype fp8 --lengths 131072 --throughput 48x32768   # FP8 KV cache, both engines
    python benchmarks/duo_speed.py --plot benchmarks/results/duo_speed.json   # PNG, locally

``--kv-cache-dtype fp8`` runs both engines with vLLM's FP8 KV cache; the floors then count one byte
per cached element (DUO's report is planned with the same dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    floors,
    model_dir,
    parameters,
    parse_backends,
    set_engine_environment,
    synthetic_prompt,
)

set_engine_environment()  # before anything imports vLLM
from _plots import backend_colour, backend_label, marks, save_png, subplots  # noqa: E402

LONGEST_POSITIONS = 4 * 1024 * 1024  # position limit given to the shapes for --longest
OUTPUT_TOKENS = 128
PREFILL_OVER_FLOOR = 1.6  # measured prefill / floor on the H100 and H200 at 128K-770K (1.45-1.65)
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# --backends variants (_common.BACKENDS): what each one does, for the table
VARIANTS = {"duo-gather": "DUO with heads in checkpoint order (gathered each step)",
            "duo-overlap": "DUO with streaming heads beside FA3 on a second stream"}


def floor_kind(backend: str) -> str:
    """Which floor a backend is held to: stock's, or DUO's (any DUO variant)."""
    return "stock" if backend == "stock" else "duo"


def measure(model: str, case: dict, duo: dict | None, decode_tokens: int, on_update,
            kv_cache_dtype: str = "auto") -> dict:
    from vllm import LLM, SamplingParams

    max_len = max(case["lengths"] + [n for n, _ in case["throughput"]]) + OUTPUT_TOKENS + 16
    kwargs = engine_kwargs(model, max_len, 0.9, duo, enable_prefix_caching=False, max_num_seqs=256,
                           kv_cache_dtype=kv_cache_dtype, disable_log_stats=False,  # per-request timestamps (RequestOutput.metrics)
                           compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES})
    start = time.time()
    llm = LLM(**kwargs)
    result = {"start_s": round(time.time() - start, 1),
              "kv_tokens": llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens,
              "lengths": {}, "throughput": {}}

    def generate(prompts, max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    generate([synthetic_prompt(4096)], 8)  # warm-up: kernels compiled for prefill and decode
    for n in case["lengths"]:
        result["lengths"][str(n)] = timed_request(llm, synthetic_prompt(n), decode_tokens)
        print(("DUO" if duo else "stock"), n, result["lengths"][str(n)], flush=True)
        on_update(result)
    for n, count in case["throughput"]:
        prompts = [synthetic_prompt(n, offset=i + 1) for i in range(count)]  # no shared prefix
        wall = generate(prompts, OUTPUT_TOKENS)
        result["throughput"][f"{count}x{n}"] = {
            "wall_s": round(wall, 2), "output_tokens_per_s": round(count * OUTPUT_TOKENS / wall, 1),
            "total_tokens_per_s": round(count * (n + OUTPUT_TOKENS) / wall, 1)}
        print(("DUO" if duo else "stock"), f"{count}x{n}", result["throughput"][f"{count}x{n}"], flush=True)
        on_update(result)
    llm.llm_engine.engine_core.shutdown(timeout=60)
    return result


def timed_request(llm, prompt, decode_tokens: int) -> dict:
    """Batch-1 TTFT and decode ms/token of one request, from the engine's per-request stats
    (needs ``disable_log_stats=False``): TTFT is its first-token latency, decode the engine-core
    time between its first and last token. One prefill per figure, and none of its run-to-run
    noise in the decode figure (when decode was the difference of two timed runs, 30 ms between
    two 128K-token prefills moved each of 64 decode tokens by 0.5 ms)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True, detokenize=False)
    stats = llm.generate([prompt], params, use_tqdm=False)[0].metrics
    if stats is None:
        raise RuntimeError("no per-request stats: start the engine with disable_log_stats=False")
    return {"ttft_s": round(stats.first_token_latency, 3),
            "decode_ms_per_token": round((stats.last_token_ts - stats.first_token_ts)
                                         / (stats.num_generation_tokens - 1) * 1e3, 2)}


def measure_longest(model: str, case: dict, duo: dict | None, decode_tokens: int, budget_s: float,
                    report: dict, device: DeviceFloors, kv_cache_dtype: str = "auto") -> dict:
    """The longest context the engine can hold (auto-fit), and batch-1 TTFT/decode there."""
    from vllm import LLM

    kwargs = engine_kwargs(model, -1, 0.9, duo, enable_prefix_caching=False, max_num_seqs=8,
                           kv_cache_dtype=kv_cache_dtype, disable_log_stats=False,  # per-request timestamps (RequestOutput.metrics)
                           hf_overrides={"max_position_embeddings": LONGEST_POSITIONS},
                           compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})
    llm = LLM(**kwargs)
    config = llm.llm_engine.vllm_config
    longest = config.model_config.max_model_len
    held = longest - decode_tokens - 2
    kind = "duo_prefill_s" if duo else "stock_prefill_s"
    n = largest_context_within(lambda m: PREFILL_OVER_FLOOR * floors(case["config"], report, m, device)[kind],
                               held, budget_s)
    floor = floors(case["config"], report, n, device)
    result = {"max_model_len": longest, "kv_tokens": config.cache_config.kv_cache_size_tokens,
              "held_context": held, "context": n, "prefill_floor_s": round(floor[kind], 1)}
    if n < held:
        result["shortened"] = shortened_reason(held, floors(case["config"], report, held, device)[kind], n, budget_s)
    timed_request(llm, synthetic_prompt(4096), decode_tokens)  # warm-up
    result.update(timed_request(llm, synthetic_prompt(n), decode_tokens))
    result["floors"] = {k: round(v, 3) for k, v in floor.items()}
    print(("DUO" if duo else "stock"), "longest", result, flush=True)
    llm.llm_engine.engine_core.shutdown(timeout=60)
    return result


def shortened_reason(held: int, held_floor_s: float, context: int, budget_s: float) -> str:
    return (f"prefill of the {held}-token context held: floor {held_floor_s:.0f} s, expected "
            f"{PREFILL_OVER_FLOOR * held_floor_s:.0f} s ({PREFILL_OVER_FLOOR}x), over the {budget_s:.0f} s "
            f"budget (--longest-budget-s); timed at {context} tokens instead")


def largest_context_within(expected_s, held: int, budget_s: float, step: int = 1024) -> int:
    """The longest context (a multiple of ``step``, at most ``held``) whose expected prefill fits."""
    if expected_s(held) <= budget_s:
        return held
    lo, hi = 0, held // step  # expected_s grows with the context: bisect on multiples of step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if expected_s(mid * step) <= budget_s else (lo, mid - 1)
    return max(step, lo * step)


def throughput_floor(config: dict, report: dict, n: int, count: int, kv_tokens: int, duo: bool,
                     device: DeviceFloors) -> float:
    """Seconds: prefill of all prompts at peak compute, plus decode steps at the bandwidth floor
    with as many requests per step as the KV pool holds (weights read once per step)."""
    f = floors(config, report, n, device)
    prefill = count * f["duo_prefill_s" if duo else "stock_prefill_s"]
    per_request = (report["retrieval_bytes_per_token"] * n + report["streaming_bytes_per_request"]
                   if duo else report["stock_bytes_per_token"] * n)
    fits = max(1, min(count, kv_tokens // (n + OUTPUT_TOKENS)))
    waves = -(-count // fits)
    step = (2 * parameters(config) + fits * per_request) / device.bandwidth
    return prefill + waves * OUTPUT_TOKENS * step


def run_case(name: str, case: dict, patterns: str, out: Path, decode_tokens: int, backends: list[str],
             device: DeviceFloors, kv_cache_dtype: str = "auto", longest_budget_s: float | None = None) -> dict:
    """Every measurement of one case (``CASES[name]``, or a copy with other lengths or workloads),
    written to ``out`` as it comes."""
    import torch

    model = model_dir(case["config"])
    duo = {"pattern": case_pattern(case["pattern"], case["config"], case["sparsity"], patterns),
           "sparsity": case["sparsity"]}
    max_len = max(case["lengths"] + [n for n, _ in case["throughput"]]) + OUTPUT_TOKENS + 16
    report = duo_report(engine_kwargs(model, max_len, 0.9, duo, kv_cache_dtype=kv_cache_dtype))
    report["streaming_window_tokens"] = report["streaming_bytes_per_request"] // max(
        1, report["stock_bytes_per_token"] - report["retrieval_bytes_per_token"])
    import vllm

    results = {"device": torch.cuda.get_device_name(0), "vllm": vllm.__version__, "case": name,
               "kv_cache_dtype": kv_cache_dtype,
               "pattern": case["pattern"] or "seeded random gates (no published pattern)", "sparsity": case["sparsity"],
               "command": " ".join(["python", "benchmarks/duo_speed.py", *sys.argv[1:]]),
               "device_floors": device.as_json(),
               "duo_report": report, "floors": {}}
    suffix = ("_longest" if longest_budget_s is not None else "") + ("" if kv_cache_dtype == "auto" else f"_{kv_cache_dtype}")
    path = out / f"duo_speed_{name}{suffix}.json"
    out.mkdir(parents=True, exist_ok=True)

    def save(key, partial):
        results[key] = partial
        path.write_text(json.dumps(results, indent=2))

    if longest_budget_s is not None:
        for backend in backends:
            results.setdefault("longest", {})[backend] = measure_longest(
                model, case, BACKENDS[backend](duo), decode_tokens, longest_budget_s, report, device, kv_cache_dtype)
            path.write_text(json.dumps(results, indent=2))
        return results
    for n in case["lengths"]:
        results["floors"][str(n)] = {k: round(v, 3) for k, v in floors(case["config"], report, n, device).items()}
    if "stock" in backends:
        save("stock", measure(model, case, None, decode_tokens, lambda r: save("stock", r), kv_cache_dtype))
    if "duo" in backends:
        save("duo", measure(model, case, duo, decode_tokens, lambda r: save("duo", r), kv_cache_dtype))
    for variant in (b for b in backends if b in VARIANTS):  # what one option buys: batch 1 only
        save(variant, measure(model, {**case, "throughput": []}, BACKENDS[variant](duo),
                              decode_tokens, lambda r, v=variant: save(v, r), kv_cache_dtype))
    for n, count in case["throughput"]:
        key = f"{count}x{n}"
        results["floors"][key] = {
            f"{b}_wall_s": round(throughput_floor(case["config"], report, n, count, results[b]["kv_tokens"],
                                                  b == "duo", device), 2)
            for b in ("stock", "duo") if b in results}
    path.write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    if "longest" in results:
        kv = "" if results.get("kv_cache_dtype", "auto") == "auto" else f", {results['kv_cache_dtype']} KV cache"
        lines = [f"{results['case']} on {results['device']}{kv}: the longest context each engine holds"]
        for backend, r in results["longest"].items():
            kind = floor_kind(backend)
            measured = (f"TTFT {r['ttft_s']} s (floor {r['floors'][f'{kind}_prefill_s']}), decode "
                        f"{r['decode_ms_per_token']} ms/token (floor {r['floors'][f'{kind}_decode_ms']:.2f})"
                        if "ttft_s" in r else r.get("skipped", ""))
            at = f" at {r['context']:,} tokens" if r.get("context", 0) < r.get("held_context", 0) else ""
            lines.append(f"{backend:>5}: max_model_len {r['max_model_len']:,}, KV {r['kv_tokens']:,} tokens; "
                         f"{measured}{at}")
        return "\n".join(lines)
    lines = [f"{results['case']} on {results['device']}",
             f"{'context':>9} {'stock TTFT':>10} {'DUO TTFT':>9} {'x':>5} {'floor s/d':>12} "
             f"{'stock dec':>9} {'DUO dec':>8} {'x':>5} {'floor s/d ms':>13}"]
    s, d = results.get("stock", {}), results.get("duo", {})
    for n, f in results["floors"].items():
        if "x" in n:
            continue
        a, b = s.get("lengths", {}).get(n), d.get("lengths", {}).get(n)
        if not (a and b):
            continue
        lines.append(f"{int(n) // 1024:>8}K {a['ttft_s']:>9.2f}s {b['ttft_s']:>8.2f}s {a['ttft_s'] / b['ttft_s']:>5.2f} "
                     f"{f['stock_prefill_s']:>5.2f}/{f['duo_prefill_s']:<5.2f}s "
                     f"{a['decode_ms_per_token']:>7.2f}ms {b['decode_ms_per_token']:>6.2f}ms "
                     f"{a['decode_ms_per_token'] / b['decode_ms_per_token']:>5.2f} "
                     f"{f['stock_decode_ms']:>6.2f}/{f['duo_decode_ms']:<6.2f}")
    for variant, label in VARIANTS.items():
        for n, g in results.get(variant, {}).get("lengths", {}).items():
            b = d.get("lengths", {}).get(n)
            lines.append(f"{int(n) // 1024:>8}K {label}: TTFT {g['ttft_s']:.2f}s, decode "
                         f"{g['decode_ms_per_token']:.2f}ms" + (f" (DUO: {b['decode_ms_per_token']:.2f}ms)" if b else ""))
    for key in s.get("throughput", {}):
        a, b = s["throughput"][key], d.get("throughput", {}).get(key)
        if b:
            f = results["floors"].get(key, {})
            lines.append(f"throughput {key}: stock {a['output_tokens_per_s']:.0f} out tok/s ({a['wall_s']} s, floor "
                         f"{f.get('stock_wall_s')} s), DUO {b['output_tokens_per_s']:.0f} ({b['wall_s']} s, floor "
                         f"{f.get('duo_wall_s')} s): {b['output_tokens_per_s'] / a['output_tokens_per_s']:.2f}x")
    lines.append(f"KV capacity: stock {s.get('kv_tokens')} tokens, DUO {d.get('kv_tokens')}")
    return "\n".join(lines)


def plot(json_path: str) -> Path:
    """PNG per case: TTFT and decode per context with their floors, and throughput (needs .[bench])."""
    results = json.loads(Path(json_path).read_text())
    if "longest" in results:
        return plot_longest(results, Path(json_path).with_suffix(".png"))
    cases = results["cases"] if "cases" in results else {results["case"]: results}
    fig, axes = subplots(len(cases), 3, figsize=(12, 3.4 * len(cases)), squeeze=False)
    for row, (name, r) in zip(axes, cases.items()):
        lengths = list(r["stock"]["lengths"])
        xs = range(len(lengths))
        for ax, metric, floor_key, title in ((row[0], "ttft_s", "prefill_s", "time to first token (s)"),
                                             (row[1], "decode_ms_per_token", "decode_ms", "decode, batch 1 (ms/token)")):
            for offset, key in ((-0.2, "stock"), (0.2, "duo")):
                ax.bar([x + offset for x in xs], [r[key]["lengths"][n][metric] for n in lengths], 0.4,
                       label=backend_label(key), color=backend_colour(key))
                marks(ax, [x + offset for x in xs], [r["floors"][n][f"{key}_{floor_key}"] for n in lengths], 18,
                      label=f"floor ({key})" if key == "stock" else None)
            ax.set_xticks(list(xs), [f"{int(n) // 1024}K" for n in lengths])
            ax.set_title(f"{name}: {title}", fontsize=8)
        row[0].legend(fontsize=7)
        # a run cut short can leave a workload measured for stock only: plot the pairs
        keys = [k for k in r["stock"].get("throughput", {}) if k in r.get("duo", {}).get("throughput", {})]
        if keys:
            for offset, key in ((-0.2, "stock"), (0.2, "duo")):
                row[2].bar([x + offset for x in range(len(keys))],
                           [r[key]["throughput"][k]["output_tokens_per_s"] for k in keys], 0.4,
                           label=backend_label(key), color=backend_colour(key))
            row[2].set_xticks(list(range(len(keys))), keys)
            row[2].set_title(f"{name}: output tokens/s ({OUTPUT_TOKENS} per request)", fontsize=8)
        else:
            row[2].axis("off")
    fig.suptitle(f"DUO vs stock FLASH_ATTN, {next(iter(cases.values()))['device']}", fontsize=9)
    return save_png(fig, json_path)


def plot_longest(results: dict, png: Path) -> Path:
    """PNG of a --longest run: the context each engine holds, and TTFT / decode there."""
    runs = results["longest"]
    names = list(runs)
    fig, axes = subplots(1, 3, figsize=(12, 3.4))
    panels = (("max_model_len", "longest context held (tokens)", None),
              ("ttft_s", "time to first token there (s)", "prefill_s"),
              ("decode_ms_per_token", "decode there, batch 1 (ms/token)", "decode_ms"))
    for ax, (key, title, floor_key) in zip(axes, panels):
        values = [runs[n].get(key, 0) for n in names]
        ax.bar(names, values, color=[backend_colour(n) for n in names])
        if floor_key:
            marks(ax, names, [runs[n].get("floors", {}).get(f"{floor_kind(n)}_{floor_key}") for n in names], 30,
                  label="floor")
            ax.legend(fontsize=7)
        for x, v in enumerate(values):
            ax.annotate(f"{v:,}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_title(title, fontsize=8)
    kv = "" if results.get("kv_cache_dtype", "auto") == "auto" else f", {results['kv_cache_dtype']} KV cache"
    fig.suptitle(f"{results['case']} on {results['device']}{kv}: the longest context each engine holds "
                 f"(contexts differ: stock {runs.get('stock', {}).get('context', 0):,}, "
                 f"DUO {runs.get('duo', {}).get('context', 0):,} tokens)", fontsize=9)
    return save_png(fig, png)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result file")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine per-case files into --out/duo_speed.json")
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--backends", default="stock,duo",
                        help="comma-separated: stock, duo, duo-gather (DUO with reorder_heads off), "
                             "duo-overlap (DUO with overlap_streaming on)")
    parser.add_argument("--patterns")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--longest", action="store_true",
                        help="the longest context each engine holds (auto-fit), and TTFT/decode there")
    parser.add_argument("--longest-budget-s", type=float, default=300.0,
                        help="--longest times TTFT/decode at the longest context whose prefill is expected "
                             "within this many seconds (the whole context held when it is)")
    parser.add_argument("--bandwidth", type=float, help="HBM bytes/s for the floors (default: from the device name)")
    parser.add_argument("--peak-flops", type=float, help="dense bf16 FLOP/s for the floors (default: from the device name)")
    parser.add_argument("--lengths", help="comma-separated batch-1 lengths instead of the case's (e.g. 131072)")
    parser.add_argument("--skip-throughput", action="store_true", help="batch-1 lengths only")
    parser.add_argument("--throughput", help="comma-separated COUNTxLENGTH workloads instead of the case's "
                                             "(e.g. 48x32768)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="both engines' --kv-cache-dtype (auto or fp8)")
    args = parser.parse_args()
    backends = parse_backends(parser, args.backends)
    if args.plot:
        print(plot(args.plot))
        return
    if args.merge:
        cases = {json.loads(Path(p).read_text())["case"]: json.loads(Path(p).read_text()) for p in args.merge}
        path = Path(args.out) / "duo_speed.json"
        path.write_text(json.dumps({"cases": cases}, indent=2))
        print(path)
        return
    if not args.case or (CASES[args.case]["pattern"] and not args.patterns):
        parser.error("--case and --patterns (the published DuoAttention pattern folders) are required")
    case = dict(CASES[args.case])  # this run's lengths and workloads; CASES stays as it is
    if args.lengths:
        case["lengths"] = [int(n) for n in args.lengths.split(",")]
    if args.throughput:
        try:
            case["throughput"] = [(int(n), int(c)) for c, n in
                                  (item.split("x") for item in args.throughput.split(","))]
        except ValueError:
            parser.error(f"--throughput {args.throughput!r}: expected COUNTxLENGTH[,COUNTxLENGTH...], e.g. 48x32768")
    if args.skip_throughput:
        case["throughput"] = []
    import torch

    device = device_floors(torch.cuda.get_device_name(0), args.bandwidth, args.peak_flops)
    results = run_case(args.case, case, args.patterns, Path(args.out), args.decode_tokens, backends, device,
                       args.kv_cache_dtype, args.longest_budget_s if args.longest else None)
    print(table(results))


if __name__ == "__main__":
    main()
    os._exit(0)  # an LLM can hang at interpreter exit on the GPU machine
