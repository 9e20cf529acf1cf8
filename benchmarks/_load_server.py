"""The server side of ``serve_load.py``: start and stop ``vllm serve`` on 127.0.0.1, and read
what it reports (``/metrics`` figures, resident memory of its processes). A library of that
script, imported by plain name from the benchmarks folder (like ``_common``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


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
    wait_healthy(proc, root, args.start_timeout, log_path)
    return proc, root + "/v1"


@contextlib.contextmanager
def stop_servers_on_sigterm():
    """Within it, SIGTERM (``timeout``, a job scheduler) raises SystemExit, so the ``finally`` that
    stops a server runs. The servers start in sessions of their own (a Ctrl-C meant for the benchmark
    must not reach them half-way), so nothing else stops them: a benchmark killed by ``timeout``
    during a start-up once left a DUO server holding 72 GB of an H100, and the next one could not start."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_healthy(proc: subprocess.Popen, root: str, timeout: float, log_path: Path, name: str = "vllm serve") -> None:
    """Until ``root``/health answers 200; stops the server and exits naming its log otherwise
    (a timeout, or the benchmark interrupted while it waits)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode} during start-up; log: {log_path}")
            try:
                with urllib.request.urlopen(root + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise SystemExit(f"{name} not healthy after {timeout:.0f} s; log: {log_path}")
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> int | None:
    """SIGTERM the server's process group (vLLM's API server and engine cores shut down cleanly on
    it), SIGKILL what is left after 60 s. Not SIGINT: a shell starts background jobs with SIGINT
    ignored, the server inherits that, and a Python that starts with SIGINT ignored never sees it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
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
