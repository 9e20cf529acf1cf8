"""Serving throughput, stock vLLM against DUO, measured by vLLM's own ``vllm bench serve``.

For each backend this starts ``vllm serve`` (stock, or ``--attention-backend DUO``) on 127.0.0.1
with the same arguments, then runs ``vllm bench serve`` once per request rate (``inf``: every
request at once, the memory-pressure case) over the same seeded random request mix: prompt and
output lengths drawn uniformly from ``LEN * (1 +- range_ratio)`` (vLLM's ``random`` dataset). While
a rate runs, ``/metrics`` is sampled for vLLM's KV-cache usage and preemption count. Reported per
backend and rate: output tokens/s, requests/s, TTFT and TPOT p50/p99 (vLLM's figures), preemptions,
peak KV usage, each server's KV capacity (its start-up log); and DUO / stock per rate. First, the
floor: stock's FLOPs over DUO's on the mix (``flop_ratio``). Long prompts with short outputs are
compute-bound, so there DUO's speed-up stays near that ratio (1.28x for the Llama-3-8B shape at 50%
with 32K-64K prompts and 256-token outputs), not near its KV capacity ratio. Only decode-heavy mixes
(long outputs, large batches) turn the capacity into throughput. After the runs, each server's
prefill and decode speeds read from its own log give the ratio the mix allows (``_engine_phases``:
the two phases add up, so the prefill share caps the ratio), printed beside the measured one.

    # GPU, Llama-3-8B shape (random weights) at 50% retrieval, 32K-64K prompts, FP8 KV:
    python benchmarks/serve_throughput.py --case llama3-8b-gqa-50 --patterns PATTERNS \\
        --input-len 48000 --range-ratio 0.33 --output-len 256 --num-prompts 64 --rates 0.5,1,inf \\
        --server-args "--kv-cache-dtype fp8" --out $OUT
    # decode-heavy: the same prompts with 1.3K-2.7K-token outputs, where the KV capacity pays:
    python benchmarks/serve_throughput.py --case llama3-8b-gqa-50 --patterns PATTERNS --output-len 2048 ... --rates inf
    # any model folder; CPU smoke run:
    python benchmarks/serve_throughput.py --model smollm2 --backends stock,duo --duo '{"sparsity": 0.5}' \\
        --input-len 300 --output-len 16 --num-prompts 8 --rates inf --server-args "--enforce-eager" --out OUT
    # a server already running (one backend, named by --backends; --model gives the tokenizer):
    python benchmarks/serve_throughput.py --server http://127.0.0.1:8000 --backends duo --model MODEL ...
    python benchmarks/serve_throughput.py --plot OUT/serve_throughput.json
    # one backend per run (a GPU call shorter than both), then one result file of both:
    python benchmarks/serve_throughput.py --merge OUT/stock/serve_throughput.json OUT/duo/serve_throughput.json --out OUT

``--case`` serves a random-weight model of a real shape (``_common.CASES``) with the published
pattern from ``--patterns``; ``vllm bench serve`` needs a tokenizer, so the shape's folder borrows
SmolLM2's (its ids are all inside the shape's vocabulary), or ``--tokenizer``'s. The result file is
rewritten after every rate, so a run cut short keeps the rates it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import CASES, KERNELS, case_pattern, model_dir, parameters, with_kernel
from _engine_phases import phase_line, phase_model, phase_rates
from _load_server import free_port, read_metrics, stop_server, stop_servers_on_sigterm, wait_healthy

# vLLM bench's result keys reported here, in this order.
FIGURES = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
           "p99_tpot_ms", "completed", "total_input_tokens", "total_output_tokens", "duration")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def served_model(args) -> tuple[str, dict, list[str]]:
    """The model folder, DUO's options, and the server arguments the model itself needs."""
    from duo_vllm.testing.models import SHORT_NAMES, resolve_short_name, smollm2_path

    duo = json.loads(args.duo)
    if args.case is None:
        model = resolve_short_name(args.model) if args.model in SHORT_NAMES else args.model
        return model, duo, []
    case = CASES[args.case]
    folder = Path(model_dir(case["config"]))
    tokenizer = Path(args.tokenizer) if args.tokenizer else smollm2_path()
    if not (tokenizer / "tokenizer.json").is_file():
        raise SystemExit(f"--tokenizer {tokenizer}: no tokenizer.json there; give a folder with a "
                         "Hugging Face tokenizer whose ids fit the shape's vocabulary (e.g. SmolLM2's)")
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    pattern = case_pattern(case["pattern"], case["config"], case["sparsity"], args.patterns)
    duo = {"pattern": pattern, "sparsity": case["sparsity"], **duo}
    max_len = args.max_model_len or max(case["lengths"])
    return str(folder), duo, ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", str(max_len)]


def flop_ratio(config: dict, duo: dict, input_len: int, output_len: int, range_ratio: float) -> dict | None:
    """Stock's FLOPs over DUO's on this mix: where a mix is compute-bound (long prompts, short
    outputs) DUO's speed-up stays near it however much more KV DUO holds; it passes it only as far
    as attention runs at a lower efficiency than the GEMMs (FA3 at long context does).

    Per request of n prompt and m output tokens: weights 2 P (n + m), causal attention 2 L H d n^2
    over the prompt and 4 L H d (n + m / 2) m over the outputs; DUO keeps that on the retrieval
    fraction and gives streaming heads their window (sink + recent) only. Lengths are vLLM's
    uniform draw, so the moments are exact. None where the figure would be a guess: a pattern's
    own sparsity (no ``sparsity`` option), or a config ``parameters`` cannot count (weights per token)."""
    from duo_vllm.config import DEFAULT_RECENT, DEFAULT_SINK

    if "sparsity" not in duo:
        return None  # the retrieval fraction is the pattern's own: not known here
    try:
        params = parameters(config)  # per token: a sparse-MoE model's active experts
        layers, q_heads = config["num_hidden_layers"], config["num_attention_heads"]
        d = config.get("head_dim") or config["hidden_size"] // q_heads
    except (KeyError, ValueError):
        return None
    retrieval = 1.0 - float(duo["sparsity"])
    window = int(duo.get("sink", DEFAULT_SINK)) + int(duo.get("recent", DEFAULT_RECENT))
    lo, hi = input_len * (1 - range_ratio), input_len * (1 + range_ratio)
    n1, n2 = (lo + hi) / 2, (lo * lo + lo * hi + hi * hi) / 3  # E[n], E[n^2]
    m = output_len  # E[m]; m and n are drawn independently
    lhd = layers * q_heads * d
    weights = 2 * params * (n1 + m)
    stock_attn = 2 * lhd * n2 + 4 * lhd * (n1 + m / 2) * m
    duo_attn = retrieval * stock_attn + (1 - retrieval) * 4 * lhd * window * (n1 + m)
    return {"ratio": (weights + stock_attn) / (weights + duo_attn),
            "attention_share_stock": stock_attn / (weights + stock_attn),
            "retrieval_fraction": retrieval, "streaming_window_tokens": window, "parameters": params}


def flop_line(flops: dict) -> str:
    """``flop_ratio``'s figure as the run prints it first and the table repeats it."""
    return (f"stock / DUO FLOPs on this mix: {flops['ratio']:.2f}x (attention {flops['attention_share_stock']:.0%} of "
            "stock's): prefill gains about that much, decode at memory pressure up to the KV capacity ratio, and a "
            "whole mix lies between, by its prefill share")


def start(model: str, backend: str, duo: dict, server_args: list[str], log_path: Path, timeout: float,
          kernel: str | None = None):
    """``vllm serve`` of ``backend`` (stock or duo); ``kernel``: stock's attention backend and DUO's
    for its retrieval heads (None: vLLM's choice for the card, DUO's "auto")."""
    port = free_port()
    if backend == "duo":
        extra = ["--attention-backend", "DUO", "--additional-config", json.dumps({"duo": with_kernel(duo, kernel)})]
    else:
        extra = [] if kernel is None else ["--attention-backend", kernel.upper()]
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, *extra, *server_args,
           "--host", "127.0.0.1", "--port", str(port), "--seed", "0"]
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with open(log_path, "w") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    print(f"[{backend}] starting: {shlex.join(cmd)}", flush=True)
    wait_healthy(proc, root, timeout, log_path, name=f"[{backend}] vllm serve")
    return proc, root


class MetricsSampler(threading.Thread):
    """Peak KV-cache usage and running requests while a rate runs (vLLM's /metrics gauges)."""

    def __init__(self, root: str, every: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.peak_kv = self.peak_running = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                m = read_metrics(self.root)
                self.peak_kv = max(self.peak_kv, m.get("vllm:kv_cache_usage_perc", 0.0))
                self.peak_running = max(self.peak_running, m.get("vllm:num_requests_running", 0.0))
            except OSError:
                pass
            self.stopped.wait(self.every)


def bench(root: str, model: str, args, rate: str, result_dir: Path, log_path: Path) -> dict:
    """One ``vllm bench serve`` run at ``rate``; its figures plus preemptions and peak KV usage."""
    name = f"rate_{rate}.json"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
           "--base-url", root, "--model", model, "--tokenizer", model, "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--random-range-ratio", str(args.range_ratio), "--num-prompts", str(args.num_prompts),
           "--request-rate", rate, "--seed", str(args.seed), "--ignore-eos", "--disable-tqdm",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(result_dir), "--result-filename", name]
    before = read_metrics(root).get("vllm:num_preemptions_total", 0.0)
    sampler = MetricsSampler(root)
    sampler.start()
    with open(log_path, "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.bench_timeout, check=False).returncode
    sampler.stopped.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"vllm bench serve failed (exit {rc}) at rate {rate}; log: {log_path}")
    raw = json.loads((result_dir / name).read_text())
    figures = {key: raw.get(key) for key in FIGURES}
    figures.update(preemptions=read_metrics(root).get("vllm:num_preemptions_total", 0.0) - before,
                   peak_kv_cache_usage=sampler.peak_kv, peak_running=sampler.peak_running,
                   failed=raw.get("num_failed", args.num_prompts - (raw.get("completed") or 0)))
    return figures


def kv_tokens_from_log(text: str) -> int | None:
    """The KV capacity vLLM logs at start-up ("GPU KV cache size: 892,256 tokens"; CPU alike)."""
    found = re.findall(r"KV cache size: ([\d,]+) tokens", text)
    return int(found[-1].replace(",", "")) if found else None


def ratios(runs: dict) -> dict:
    """DUO / stock per rate: throughput up is better, latency down is better (stock / DUO)."""
    out = {}
    for rate, stock in runs.get("stock", {}).items():
        duo = runs.get("duo", {}).get(rate)
        if not duo:
            continue
        out[rate] = {"output_throughput": duo["output_throughput"] / stock["output_throughput"],
                     "request_throughput": duo["request_throughput"] / stock["request_throughput"],
                     "p99_ttft_speedup": stock["p99_ttft_ms"] / duo["p99_ttft_ms"],
                     "p99_tpot_speedup": stock["p99_tpot_ms"] / duo["p99_tpot_ms"]}
    return out


def table(result: dict) -> str:
    header = (f"{'backend':8} {'rate':>6} {'out tok/s':>10} {'req/s':>7} {'TTFT p50':>9} {'p99':>9} "
              f"{'TPOT p50':>9} {'p99':>8} {'preempt':>8} {'KV peak':>8}")
    lines = [header]
    for backend, runs in result["runs"].items():
        for rate, f in runs.items():
            lines.append(f"{backend:8} {rate:>6} {f['output_throughput']:10.1f} {f['request_throughput']:7.3f} "
                         f"{f['median_ttft_ms']:9.0f} {f['p99_ttft_ms']:9.0f} {f['median_tpot_ms']:9.1f} "
                         f"{f['p99_tpot_ms']:8.1f} {f['preemptions']:8.0f} {f['peak_kv_cache_usage']:8.2f}")
    kv = result.get("kv_tokens") or {}
    if kv.get("stock") and kv.get("duo"):
        lines.append(f"KV cache: stock {kv['stock']:,} tokens, DUO {kv['duo']:,} ({kv['duo'] / kv['stock']:.2f}x)")
    mix = result.get("mix_tokens")
    fills = [f"{mix / tokens:.2f}x {backend}'s" for backend, tokens in kv.items() if tokens and mix]
    if mix and fills:
        lines.append(f"the whole mix at its end: {mix:,} tokens = {', '.join(fills)} KV (below 1: held all at once, "
                     "no memory pressure)")
    if result.get("flop_ratio"):
        lines.append(flop_line(result["flop_ratio"]))
    if result.get("phase_model"):
        lines.append(phase_line(result["phase_model"]))
    for rate, r in result.get("duo_over_stock", {}).items():
        lines.append(f"DUO / stock at rate {rate}: output tokens/s {r['output_throughput']:.2f}x, requests/s "
                     f"{r['request_throughput']:.2f}x; stock / DUO p99 TTFT {r['p99_ttft_speedup']:.2f}, "
                     f"p99 TPOT {r['p99_tpot_speedup']:.2f} (above 1: DUO faster)")
    return "\n".join(lines)


def plot(path: Path) -> Path:
    """Output throughput and p99 TTFT against the request rate, stock and DUO (``inf`` last)."""
    from _plots import backend_colour, backend_label, save_png, subplots

    result = json.loads(Path(path).read_text())
    fig, (ax_tp, ax_ttft) = subplots(1, 2, figsize=(10, 4))
    rates = list(next(iter(result["runs"].values())))
    xs = range(len(rates))
    for backend, runs in result["runs"].items():
        label = "stock CPU_ATTN" if backend == "stock" and result["device"] == "cpu" else backend_label(backend)
        kw = {"marker": "o", "color": backend_colour(backend), "label": label}
        ax_tp.plot(xs, [runs[r]["output_throughput"] for r in rates], **kw)
        ax_ttft.plot(xs, [runs[r]["p99_ttft_ms"] / 1000 for r in rates], **kw)
    for ax, title in ((ax_tp, "output tokens/s"), (ax_ttft, "p99 TTFT (s)")):
        ax.set_xticks(list(xs), [f"{r} req/s" if r != "inf" else "all at once" for r in rates])
        ax.set_title(title)
        ax.set_ylim(bottom=0)  # from zero: the gap between the backends at its true scale
        ax.legend()
    fig.suptitle(f"{result['model_label']} on {result['device']}, vLLM {result['vllm']}: "
                 f"{result['workload']}", fontsize=9)
    return save_png(fig, path)


def merge(paths: list[str]) -> dict:
    """One result of runs made one backend at a time over the same workload, on the same device."""
    parts = []
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--merge: cannot read {path}: {exc}") from None
        if not isinstance(part, dict) or not isinstance(part.get("runs"), dict):
            raise SystemExit(f"--merge: {path} is not a serve_throughput.py result (no \"runs\")")
        parts.append(part)
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        for key in ("device", "vllm", "model_label", "workload", "server_args", "kernel"):
            if part.get(key) != first.get(key):
                raise SystemExit(f"--merge: {path} differs in {key} ({part.get(key)!r} against "
                                 f"{first.get(key)!r}); merge only runs of one workload on one device")
        if set(part["runs"]) & set(first["runs"]):
            raise SystemExit(f"--merge: {path} repeats backend {sorted(set(part['runs']) & set(first['runs']))}")
    result = {**first, "command": [p["command"] for p in parts], "runs": {}, "kv_tokens": {}, "phase_rates": {}}
    for path, part in zip(paths, parts):
        result["runs"].update(part["runs"])
        result["kv_tokens"].update(part.get("kv_tokens") or {})
        result["phase_rates"].update(part.get("phase_rates") or {})
        for backend in part["runs"]:  # a part run before phase rates were recorded: its server log, if beside it
            log = Path(path).parent / f"serve_throughput_{backend}.log"
            if result["phase_rates"].get(backend) is None and log.is_file():
                result["phase_rates"][backend] = phase_rates(log.read_text(errors="replace"))
    return result


def mix_phase_model(result: dict) -> dict | None:
    """The two-phase model (``_engine_phases``) of the all-at-once run, from its token counts (a
    run without ``total_input_tokens``: the nominal mix less its measured outputs)."""
    stock = result["runs"].get("stock", {}).get("inf")
    if not stock or not stock.get("total_output_tokens"):
        return None
    output = stock["total_output_tokens"]
    prompt = stock.get("total_input_tokens") or (result.get("mix_tokens") or 0) - output
    return phase_model(result.get("phase_rates") or {}, prompt, output)


def write(result: dict, out: Path) -> Path:
    result["duo_over_stock"] = ratios(result["runs"])
    result["phase_model"] = mix_phase_model(result)
    path = out / "serve_throughput.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def report(result: dict, out: Path) -> None:
    """The final JSON, its PNG where matplotlib is installed, and the table."""
    path = write(result, out)
    try:
        print(plot(path))
    except ImportError:
        print("matplotlib not installed: no PNG (pip install '.[bench]'; then --plot)")
    print(table(result))


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result file")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only join result files of one backend each (same workload and device) into --out")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="model folder or duo_vllm.testing short name (smollm2, qwen-coder-0.5b)")
    source.add_argument("--case", choices=sorted(CASES), help="random weights of a real shape (with --patterns)")
    parser.add_argument("--patterns", help="folder of the published pattern folders (with --case)")
    parser.add_argument("--tokenizer", help="with --case: tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--backends", default="stock,duo", help="comma-separated: stock, duo")
    parser.add_argument("--duo", default="{}", help="DUO options as JSON (with --case: added to the case's)")
    parser.add_argument("--server", metavar="URL", help="measure this running server instead of starting one "
                        "(one backend in --backends names it)")
    parser.add_argument("--server-args", default="", help="more `vllm serve` arguments, the same for every backend")
    parser.add_argument("--kernel", choices=KERNELS,
                        help="stock's attention backend and DUO's for its retrieval heads (default: vLLM's choice)")
    parser.add_argument("--max-model-len", type=int, help="with --case (default: the case's longest length)")
    parser.add_argument("--input-len", type=int, default=48000, help="mean prompt length (tokens)")
    parser.add_argument("--output-len", type=int, default=256, help="mean output length (tokens)")
    parser.add_argument("--range-ratio", type=float, default=0.33,
                        help="lengths drawn uniformly from LEN * (1 +- ratio), prompts and outputs")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--rates", default="1,inf", help="comma-separated requests/s; inf = all at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--bench-timeout", type=float, default=3600.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if args.plot:
        print(plot(Path(args.plot)))
        return 0
    if args.merge:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report(merge(args.merge), out)
        return 0
    if (args.model is None) == (args.case is None):
        parser.error("give --model or --case")
    if args.case and CASES[args.case]["pattern"] and not args.patterns:
        parser.error("--case needs --patterns (the published DuoAttention pattern folders)")
    backends = args.backends.split(",")
    if set(backends) - {"stock", "duo"}:
        parser.error(f"--backends: unknown {sorted(set(backends) - {'stock', 'duo'})}; use stock, duo")
    if args.server and (len(backends) != 1 or args.case):
        parser.error("--server measures one running server: give one backend name in --backends, and --model")
    rates = args.rates.split(",")
    for rate in rates:
        if rate != "inf" and not (rate.replace(".", "", 1).isdigit() and float(rate) > 0):
            parser.error(f"--rates: {rate!r} is neither a positive number nor inf")
    try:
        json.loads(args.duo)
    except ValueError as exc:
        parser.error(f"--duo is not JSON: {exc}")

    import vllm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, duo, model_args = served_model(args)
    server_args = model_args + shlex.split(args.server_args)
    work = Path(tempfile.mkdtemp(prefix="serve-throughput-"))
    workload = (f"{args.num_prompts} requests, prompts {round(args.input_len * (1 - args.range_ratio))}-"
                f"{round(args.input_len * (1 + args.range_ratio))} tokens, outputs "
                f"{round(args.output_len * (1 - args.range_ratio))}-{round(args.output_len * (1 + args.range_ratio))}"
                f" tokens (uniform, seed {args.seed})")
    config = json.loads((Path(model) / "config.json").read_text()) if (Path(model) / "config.json").is_file() else {}
    flops = flop_ratio(config, duo, args.input_len, args.output_len, args.range_ratio)
    result = {"command": shlex.join([sys.executable, *sys.argv]), "device": device_name(), "vllm": vllm.__version__,
              "model_label": args.case or Path(model).name, "duo": duo, "server_args": server_args, "kernel": args.kernel,
              "workload": workload, "flop_ratio": flops, "rates": rates, "kv_tokens": {}, "runs": {}, "phase_rates": {},
              # every request's prompt and output at once (the mean lengths of the uniform draw)
              "mix_tokens": args.num_prompts * (args.input_len + args.output_len)}
    if flops:
        print(flop_line(flops), flush=True)
    with stop_servers_on_sigterm():  # a `timeout` of this script stops the server it started
        for backend in backends:
            log_path = out / f"serve_throughput_{backend}.log"
            if args.server:
                proc, root = None, args.server.rstrip("/").removesuffix("/v1")
            else:
                proc, root = start(model, backend, duo, server_args, log_path, args.start_timeout, args.kernel)
            # a running server's log is not ours to read: its capacity stays unknown (None)
            result["kv_tokens"][backend] = None if proc is None else kv_tokens_from_log(log_path.read_text(errors="replace"))
            if result["kv_tokens"][backend]:
                fill = result["mix_tokens"] / result["kv_tokens"][backend]
                print(f"[{backend}] KV cache {result['kv_tokens'][backend]:,} tokens: the whole mix at its end is {fill:.2f}x it"
                      + (" (it fits: all at once is no memory pressure for this server)" if fill < 1 else ""), flush=True)
            try:
                result["runs"][backend] = {}
                for rate in rates:
                    print(f"[{backend}] rate {rate}: {workload}", flush=True)
                    figures = bench(root, model, args, rate, work, out / f"serve_throughput_{backend}_bench.log")
                    result["runs"][backend][rate] = figures
                    write(result, out)
                    print(f"[{backend}] rate {rate}: {figures['output_throughput']:.1f} output tok/s, "
                          f"p99 TTFT {figures['p99_ttft_ms']:.0f} ms, {figures['preemptions']:.0f} preemptions", flush=True)
            finally:
                if proc is not None:
                    stop_server(proc)
                    result["phase_rates"][backend] = phase_rates(log_path.read_text(errors="replace"))
    report(result, out)
    failed = sum(f["failed"] or 0 for runs in result["runs"].values() for f in runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
