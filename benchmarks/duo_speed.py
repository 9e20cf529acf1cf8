"""Time to first token and decode speed of DUO against stock FLASH_ATTN, same run, same GPU.

Llama-3-8B shape (dummy weights) with the published Llama-3-8B-Instruct-Gradient-1048k pattern
at 50% retrieval; batch 1, greedy, prefix caching off. Stock runs with vLLM's defaults (torch
compile + CUDA graphs); DUO runs eagerly (its streaming pass has no CUDA-graph support yet, see
docs/backend.md), so this measures where the current correctness path stands, not the target.
Floors (H100 SXM, 3.35 TB/s): decode = (weights + KV read per token) / bandwidth.

    python benchmarks/duo_speed.py --patterns /path/to/duo-attention-patterns --out $OUT
    python benchmarks/duo_speed.py --plot benchmarks/results/duo_speed.json   # PNG, locally
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from kv_capacity import LLAMA3_8B, engine_kwargs, model_dir, synthetic_prompt  # noqa: E402

BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
WEIGHTS = 16.06e9  # Llama-3-8B bf16 bytes
KV_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head dim x (K, V) x bf16


def run(model: str, lengths: list[int], duo: dict | None, decode_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    # Stock keeps vLLM's defaults (compile + CUDA graphs); DUO runs eagerly.
    kwargs = engine_kwargs(model, max(lengths) + decode_tokens + 16, 0.9, duo, enable_prefix_caching=False,
                           **({"enforce_eager": True} if duo is not None else {}))
    start = time.time()
    llm = LLM(**kwargs)
    result = {"start_s": round(time.time() - start, 1), "lengths": {}}
    for n in lengths:
        prompt = synthetic_prompt(n)

        def timed(max_tokens: int, llm=llm, prompt=prompt) -> float:
            t = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                                  detokenize=False), use_tqdm=False)
            return time.perf_counter() - t

        timed(1)  # warm-up at this length
        ttft = timed(1)
        total = timed(decode_tokens + 1)
        decode_ms = (total - ttft) / decode_tokens * 1000
        result["lengths"][str(n)] = {"ttft_s": round(ttft, 3), "decode_ms_per_token": round(decode_ms, 2)}
        print(("DUO" if duo else "stock"), n, result["lengths"][str(n)], flush=True)
    llm.llm_engine.engine_core.shutdown(timeout=60)
    del llm
    return result


def plot(json_path: str) -> Path:
    """PNG of TTFT and decode time per length, with the decode floors (needs .[bench])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(json_path).read_text())
    lengths = list(results["stock"]["lengths"])
    xs = list(range(len(lengths)))
    fig, (ax_ttft, ax_dec) = plt.subplots(1, 2, figsize=(9, 3.6))
    for offset, key, label in ((-0.2, "stock", "stock FLASH_ATTN (graphs)"), (0.2, "duo", "DUO (eager)")):
        runs = results[key]["lengths"]
        ax_ttft.bar([x + offset for x in xs], [runs[n]["ttft_s"] for n in lengths], 0.4, label=label)
        ax_dec.bar([x + offset for x in xs], [runs[n]["decode_ms_per_token"] for n in lengths], 0.4, label=label)
    for key, style in (("stock_decode_ms", "k--"), ("duo_decode_ms", "k:")):
        ax_dec.plot(xs, [results["floors"][n][key] for n in lengths], style,
                    label=f"floor, {key.split('_')[0]}")
    for ax, title in ((ax_ttft, "time to first token (s)"), (ax_dec, "decode (ms/token)")):
        ax.set_xticks(xs, [f"{int(n) // 1024}K" for n in lengths])
        ax.set_title(title, fontsize=9)
    ax_dec.legend(fontsize=7)
    fig.suptitle(f"Llama-3-8B shape, batch 1, {results['device']}", fontsize=9)
    fig.tight_layout()
    png = Path(json_path).with_suffix(".png")
    fig.savefig(png, dpi=120)
    return png


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result file")
    parser.add_argument("--patterns")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    if not args.patterns:
        parser.error("--patterns is required (the published DuoAttention pattern folders)")
    import torch

    lengths = [int(x) for x in args.lengths.split(",")]
    model = model_dir(LLAMA3_8B)
    duo = {"pattern": str(Path(args.patterns) / "Llama-3-8B-Instruct-Gradient-1048k"), "sparsity": 0.5}
    results = {"device": torch.cuda.get_device_name(0),
               "command": "python benchmarks/duo_speed.py --patterns PATTERNS --out OUT",
               "stock": run(model, lengths, None, args.decode_tokens),
               "duo": run(model, lengths, duo, args.decode_tokens), "floors": {}}
    for n in lengths:
        results["floors"][str(n)] = {
            "stock_decode_ms": round((WEIGHTS + KV_PER_TOKEN * n) / BANDWIDTH * 1000, 2),
            "duo_decode_ms": round((WEIGHTS + KV_PER_TOKEN * (n / 2 + 320 / 2)) / BANDWIDTH * 1000, 2),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "duo_speed.json").write_text(json.dumps(results, indent=2))
    print(f"{'length':>8} {'stock TTFT':>11} {'DUO TTFT':>9} {'stock dec':>10} {'DUO dec':>8} {'floors':>14}")
    for n in lengths:
        s, d, f = results["stock"]["lengths"][str(n)], results["duo"]["lengths"][str(n)], results["floors"][str(n)]
        print(f"{n:>8} {s['ttft_s']:>10.2f}s {d['ttft_s']:>8.2f}s {s['decode_ms_per_token']:>8.2f}ms "
              f"{d['decode_ms_per_token']:>6.2f}ms {f['stock_decode_ms']:>6.2f}/{f['duo_decode_ms']:.2f}ms")


if __name__ == "__main__":
    main()
    os._exit(0)  # an LLM can hang at interpreter exit on the GPU machine
