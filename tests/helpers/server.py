"""Run ``vllm serve`` as a subprocess for end-to-end tests.

``vllm_server`` starts the server in its own process group, waits for ``/health`` and, on exit,
stops the whole group with SIGINT (as Ctrl-C would) and checks that the server and every engine
process it started are gone. ``run_vllm_expect_failure`` is for start-up error tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers.engine import vllm_env_defaults

LOG_TAIL_LINES = 80
STOP_GRACE_S = 30.0
_POLL_S = 0.5


@dataclass
class ServerHandle:
    port: int
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    #: Seconds from SIGINT until the whole process group was gone (set on exit).
    stop_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def client(self, **kwargs):
        import openai

        kwargs.setdefault("timeout", 120.0)
        return openai.OpenAI(base_url=self.base_url, api_key="EMPTY", **kwargs)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_command(model: str, port: int, extra_args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
            "--host", "127.0.0.1", "--port", str(port), *extra_args]


def _start(model: str, extra_args: tuple[str, ...], env: dict | None,
           cache_dir: str, script: Path | None = None) -> ServerHandle:
    port = _free_port()
    if script is not None:  # a script that starts the server itself, on the port in $PORT
        env = {**(env or {}), "PORT": str(port)}
    # os.environ wins over the defaults (as apply_vllm_env's setdefault does); `env` wins over both,
    # and a None there removes the variable.
    full_env = {**vllm_env_defaults(cache_dir), **os.environ, **{k: str(v) for k, v in (env or {}).items()}}
    for key in [k for k, v in (env or {}).items() if v is None]:
        full_env.pop(key, None)
    fd, log_name = tempfile.mkstemp(prefix=f"vllm-serve-{port}-", suffix=".log")
    cmd = ["bash", str(script), *extra_args] if script is not None else _serve_command(model, port, extra_args)
    with os.fdopen(fd, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=full_env,
                                   start_new_session=True)
    return ServerHandle(port=port, log_path=Path(log_name), process=process)


def _healthy(handle: ServerHandle) -> bool:
    try:
        with urllib.request.urlopen(f"{handle.root_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for proc in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop(handle: ServerHandle, grace: float = STOP_GRACE_S) -> list[str]:
    """SIGINT the group, wait up to ``grace`` s, SIGKILL what is left. Returns the problems seen."""
    process, pgid = handle.process, handle.process.pid  # new session: pgid == pid
    problems: list[str] = []
    start = time.monotonic()
    _signal_group(pgid, signal.SIGINT)
    deadline = start + grace
    while time.monotonic() < deadline:
        if process.poll() is not None and not _group_members(pgid):
            handle.stop_seconds = time.monotonic() - start
            break
        time.sleep(0.2)
    else:
        left = _group_members(pgid)
        problems.append(
            f"still running {grace:.0f} s after SIGINT (killed with SIGKILL): "
            + ", ".join(f"{p.pid} {p.info.get('name')}" for p in left)
            + ("" if process.poll() is None else f"; server exited {process.returncode}")
        )
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    left = _group_members(pgid)
    if left:
        problems.append("left running in the process group after SIGKILL: "
                        + ", ".join(f"{p.pid} {p.info.get('name')}" for p in left))
    return problems


def _wait_healthy(handle: ServerHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if handle.process.poll() is not None:
            raise RuntimeError(
                f"vllm serve exited with code {handle.process.returncode} before becoming healthy; "
                f"last {LOG_TAIL_LINES} log lines ({handle.log_path}):\n{handle.log_tail()}")
        if _healthy(handle):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"vllm serve not healthy after {timeout:.0f} s; last {LOG_TAIL_LINES} log lines "
                f"({handle.log_path}):\n{handle.log_tail()}")
        time.sleep(_POLL_S)


@contextlib.contextmanager
def vllm_server(model: str | None, *extra_args: str, env: dict | None = None,
                timeout: float = 240, script: Path | None = None) -> Iterator[ServerHandle]:
    """Start ``vllm serve model *extra_args`` (or ``bash script *extra_args``, which serves on
    ``$PORT``) and yield a handle once ``/health`` answers 200.

    On exit the server must stop within 30 s of SIGINT with nothing left in its process group,
    else AssertionError (raised only when the body itself did not fail).
    """
    cache_dir = tempfile.mkdtemp(prefix="duo-vllm-serve-cache-")
    handle = _start(model, extra_args, env, cache_dir, script)
    body_failed = False
    try:
        _wait_healthy(handle, timeout)
        yield handle
    except BaseException:
        body_failed = True
        raise
    finally:
        problems = _stop(handle)
        shutil.rmtree(cache_dir, ignore_errors=True)
        if problems and not body_failed:
            raise AssertionError(
                "vllm serve did not stop cleanly: " + "; ".join(problems)
                + f"\nlast {LOG_TAIL_LINES} log lines ({handle.log_path}):\n{handle.log_tail()}")


def run_vllm_expect_failure(model: str, *extra_args: str, env: dict | None = None,
                            timeout: float = 240) -> tuple[int, str]:
    """Start ``vllm serve`` expecting it to fail during start-up; returns (returncode, log text).

    Raises AssertionError ("expected start-up failure") when the server becomes healthy or is
    still running after ``timeout`` seconds (it is killed either way).
    """
    cache_dir = tempfile.mkdtemp(prefix="duo-vllm-serve-cache-")
    handle = _start(model, extra_args, env, cache_dir)
    try:
        deadline = time.monotonic() + timeout
        while handle.process.poll() is None:
            if _healthy(handle):
                raise AssertionError(
                    "expected start-up failure, but vllm serve became healthy; last "
                    f"{LOG_TAIL_LINES} log lines ({handle.log_path}):\n{handle.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected start-up failure, but vllm serve was still running after "
                    f"{timeout:.0f} s; last {LOG_TAIL_LINES} log lines ({handle.log_path}):\n"
                    f"{handle.log_tail()}")
            time.sleep(_POLL_S)
        # Reap engine processes a failed start may have left behind.
        _stop(handle, grace=10)
        return handle.process.returncode, handle.log_text()
    finally:
        if handle.process.poll() is None or _group_members(handle.process.pid):
            _stop(handle, grace=5)
        shutil.rmtree(cache_dir, ignore_errors=True)
