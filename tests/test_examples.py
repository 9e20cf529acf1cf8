"""The examples run as a user runs them: the offline demo, the server script queried by the
``openai`` client example, and training a pattern then checking it. The offline ones run their
engine core inside the script's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as
tests/helpers/llm.py's engines do: a spawned engine process costs ~10 s of imports on two cores);
the server example keeps vLLM's own processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.server import vllm_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(cmd, timeout, env=None):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHON": sys.executable, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                              **(env or {})})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_generate_demo_finds_the_pass_key():
    out = run([sys.executable, str(EXAMPLES / "generate_duo.py"), "--context", "800"], timeout=600)
    assert "DUO answer" in out and "58213" in out, out[-2000:]


def test_serve_script_answers_the_openai_client_example(capsys):
    with vllm_server(None, "--max-num-seqs", "4", script=EXAMPLES / "serve_duo.sh",
                     env={"PYTHON": sys.executable}) as srv:
        assert "DUO attention: pattern" in srv.log_text(), srv.log_tail()
        sys.path.insert(0, str(EXAMPLES))
        try:
            import openai_client

            openai_client.main(["--base-url", srv.base_url, "--context", "800"])
        finally:
            sys.path.remove(str(EXAMPLES))
    out = capsys.readouterr().out
    assert "completion: " in out and "streamed chat: " in out, out
    assert "58213" in out.split("pass key (", 1)[1], out


def test_train_and_check_example(tmp_path):
    out = run(["bash", str(EXAMPLES / "train_and_check.sh"), str(tmp_path)], timeout=1200, env={"STEPS": "4", "BACKENDS": "duo"})
    assert (tmp_path / "pattern" / "duo_pattern.json").is_file()
    assert "mean score (0-100) per task" in out, out[-3000:]
