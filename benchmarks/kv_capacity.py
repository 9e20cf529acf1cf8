"""KV capacity of DUO against stock vLLM on one GPU, same memory budget, same run.

For each shape (random weights of a real architecture, ``load_format="dummy"``): start stock
FLASH_ATTN, read vLLM's "KV cache size: N tokens", shut it down; start DUO with a published
DuoAttention pattern, read the same figure and DUO's own report, generate a few tokens from a
long prompt (the new layout runs end to end), shut it down. Writes JSON and prints a table last;
``--plot JSON`` draws the PNG where matplotlib is installed (the GPU machine has none).

    python benchmarks/kv_capacity.py --patterns /path/to/duo-attention-patterns --out $OUT
    python benchmarks/kv_capacity.py --plot benchmarks/results/kv_capacity.json

Shapes: Llama-3-8B (GQA, 8 KV heads) with the Llama-3-8B-Instruct-Gradient-1048k pattern at 50%
retrieval; Llama-2-7B (MHA) with the Llama-2-7B-32K-Instruct pattern at 25% retrieval; by name
(``--shapes qwen3-30b-a3b-moe-50``), Qwen3-30B-A3B (sparse MoE, 4 KV heads) at 50% with seeded
random gates, since no pattern was published for it (on random weights only the count matters).
``--kv-cache-dtypes auto,fp8`` measures both at each KV-cache dtype (``--kv-cache-dtype fp8``
halves every page, DUO's two groups included), so the table has stock-bf16, stock-fp8, DUO-bf16
and DUO-fp8 side by side.

    python benchmarks/kv_capacity.py --patterns /path/to/patterns --kv-cache-dtypes auto,fp8 --out $OUT

``--kernel flashinfer`` runs stock on FLASHINFER and DUO's retrieval heads through it;
``--attention-config '{"flash_attn_version": 2}'`` gives every engine vLLM's attention config
(FA2, also on Hopper).
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
    DEFAULT_SHAPES,
    KERNELS,
    SHAPES,
    case_pattern,
    duo_report,
    engine_kwargs,
    json_object,
    model_dir,
    set_engine_environment,
    synthetic_prompt,
)

set_engine_environment()  # before vLLM is imported
from _plots import backend_label, save_png, subplots  # noqa: E402


def measure(model: str, max_model_len: int, gpu_util: float, duo: dict | None, kv_cache_dtype: str = "auto",
            kernel: str | None = None, attention_config: dict | None = None) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(model, max_model_len, gpu_util, duo, kernel, enforce_eager=True, kv_cache_dtype=kv_cache_dtype,
                           **({"attention_config": attention_config} if attention_config else {}))
    start = time.time()
    llm = LLM(**kwargs)
    result = {"start_s": round(time.time() - start, 1),
              "kv_tokens": llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens}
    prompt = synthetic_prompt(8192)
    t = time.time()
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, detokenize=False),
                       use_tqdm=False)[0]
    result["generated_tokens"] = len(out.outputs[0].token_ids)
    result["generate_8k_s"] = round(time.time() - t, 2)
    if duo is not None:
        result["report"] = duo_report(kwargs)
    llm.llm_engine.engine_core.shutdown(timeout=60)
    del llm
    return result


def plot(json_path: str) -> Path:
    """PNG bar chart next to the JSON (run where matplotlib is installed: pip install .[bench])."""
    results = json.loads(Path(json_path).read_text())
    names = list(results["shapes"])
    dtypes = list(results["shapes"][names[0]].get("by_kv_cache_dtype", {"auto": None}))
    series = [(dtype, key) for dtype in dtypes for key in ("stock", "duo")]
    width = 0.8 / len(series)
    fig, ax = subplots(figsize=(3.5 + 1.5 * len(series), 3.8))
    xs = list(range(len(names)))
    for i, (dtype, key) in enumerate(series):
        runs = [results["shapes"][n].get("by_kv_cache_dtype", {"auto": results["shapes"][n]})[dtype] for n in names]
        values = [run[key]["kv_tokens"] for run in runs]
        label = f"{backend_label(key)}, KV {'bf16' if dtype == 'auto' else dtype}"
        bars = ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], values, width, label=label)
        ax.bar_label(bars, labels=[f"{v / 1000:.0f}K" for v in values], fontsize=7)

    def caption(n):
        runs = results["shapes"][n].get("by_kv_cache_dtype", {"auto": results["shapes"][n]})
        return n + "".join(f"\nDUO/stock {'bf16' if d == 'auto' else d} {r['ratio']:.2f}x" for d, r in runs.items())

    ax.set_xticks(xs, [caption(n) for n in names], fontsize=8)
    ax.set_ylabel("vLLM KV cache size (tokens)")
    ax.set_title(f"KV capacity at the same memory budget, {results['device']}", fontsize=9)
    ax.legend()
    return save_png(fig, json_path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result file")
    parser.add_argument("--patterns", help="folder with the published DuoAttention patterns")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--kv-cache-dtypes", default="auto",
                        help="comma-separated --kv-cache-dtype values to measure (e.g. auto,fp8)")
    parser.add_argument("--kernel", choices=KERNELS,
                        help="stock's attention backend and DUO's for its retrieval heads (default: vLLM's choice)")
    parser.add_argument("--attention-config", type=json_object, default={}, metavar="JSON",
                        help='every engine\'s vLLM attention config, e.g. \'{"flash_attn_version": 2}\' (FA2 on Hopper)')
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    if not args.patterns and any(SHAPES[name][1] for name in shapes):
        parser.error("--patterns is required (the published DuoAttention pattern folders)")
    import torch
    import vllm

    results = {"device": torch.cuda.get_device_name(0), "vllm": vllm.__version__,
               "gpu_memory_utilization": args.gpu_memory_utilization, "kernel": args.kernel,
               "attention_config": args.attention_config,
               "command": " ".join(["python", "benchmarks/kv_capacity.py", *sys.argv[1:]]), "shapes": {}}
    for name in shapes:
        config, pattern, sparsity, max_len = SHAPES[name]
        model = model_dir(config)
        duo = {"pattern": case_pattern(pattern, config, sparsity, args.patterns), "sparsity": sparsity}
        runs = {}
        for kv_dtype in args.kv_cache_dtypes.split(","):
            stock = measure(model, max_len, args.gpu_memory_utilization, None, kv_dtype, args.kernel, args.attention_config)
            duo_r = measure(model, max_len, args.gpu_memory_utilization, duo, kv_dtype, args.kernel, args.attention_config)
            runs[kv_dtype] = {"stock": stock, "duo": duo_r, "ratio": duo_r["kv_tokens"] / stock["kv_tokens"]}
            print(name, kv_dtype, json.dumps(runs[kv_dtype]), flush=True)
        entry = {"max_model_len": max_len, "sparsity": sparsity, "by_kv_cache_dtype": runs}
        if "auto" in runs:  # the layout of earlier result files
            entry.update(runs["auto"])
            for kv_dtype, run in runs.items():
                if kv_dtype != "auto":
                    entry[f"duo_{kv_dtype}_vs_stock_bf16"] = run["duo"]["kv_tokens"] / runs["auto"]["stock"]["kv_tokens"]
        results["shapes"][name] = entry
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kv_capacity.json").write_text(json.dumps(results, indent=2))
    print(f"{'shape':<20} {'KV dtype':>8} {'stock tokens':>14} {'DUO tokens':>12} {'ratio':>7} {'bound':>7}")
    for name, entry in results["shapes"].items():
        for kv_dtype, r in entry["by_kv_cache_dtype"].items():
            print(f"{name:<20} {kv_dtype:>8} {r['stock']['kv_tokens']:>14,} {r['duo']['kv_tokens']:>12,} "
                  f"{r['ratio']:>7.2f} {r['duo']['report']['theoretical_ratio']:>7.2f}")


if __name__ == "__main__":
    main()
    os._exit(0)  # an LLM can hang at interpreter exit on the GPU machine
