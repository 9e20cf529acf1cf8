"""benchmarks/_load_server.py: a benchmark stopped by SIGTERM (``timeout``) while its server starts
must stop that server, which runs in a session of its own and so gets no signal of its own. A
sleeping Python stands in for ``vllm serve``: what is tested is who stops the process, not vLLM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

# Starts a "server" that never answers /health and waits for it, as serve_throughput.start does.
SCRIPT = textwrap.dedent("""
    import contextlib, signal, subprocess, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    if sys.argv[4] == "ignored":  # as a shell starts a background job (`cmd &`): inherited by the server
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    from _load_server import free_port, stop_servers_on_sigterm, wait_healthy
    guard = stop_servers_on_sigterm() if sys.argv[2] == "guarded" else contextlib.nullcontext()
    with guard:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        print(proc.pid, flush=True)
        wait_healthy(proc, f"http://127.0.0.1:{free_port()}", 120, Path(sys.argv[3]))
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose: only its parent's wait is missing
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.parametrize(("mode", "sigint"), [("guarded", "default"), ("guarded", "ignored"), ("unguarded", "default")])
def test_sigterm_during_start_up_stops_the_server(tmp_path, mode, sigint):
    # "ignored": a benchmark started as a background job, whose server a SIGINT would never stop
    bench = subprocess.Popen([sys.executable, "-c", SCRIPT, str(BENCHMARKS), mode, str(tmp_path / "log"), sigint],
                             stdout=subprocess.PIPE, text=True)
    server = int(bench.stdout.readline())
    try:
        time.sleep(1.5)  # inside wait_healthy's loop
        bench.send_signal(signal.SIGTERM)
        code = bench.wait(timeout=45)  # stop_server escalates to SIGKILL only after 60 s
        deadline = time.monotonic() + (10 if mode == "guarded" else 0)  # the control's server stays up
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        if mode == "guarded":
            assert code == 128 + signal.SIGTERM
            assert not alive(server), "the benchmark exited and left its server running"
        else:  # the control: without the guard, SIGTERM kills the benchmark alone and the server stays
            assert code == -signal.SIGTERM
            assert alive(server)
    finally:
        if alive(server):
            os.killpg(server, signal.SIGKILL)
