"""A DUO server under faults and a small load: every bad request gets a 4xx (or a clean abort), the
server keeps serving, nothing is lost, and the KV pool drains back to where it started.

One server for the module (SmolLM2, fp32 so greedy outputs do not depend on the batch, a 96 MiB KV
pool that holds about three max-length requests, so long ones queue and get preempted). The last
test runs the project's load script (benchmarks/serve_load.py) against it at CI scale.

A request that needs more than the whole pool at its peak cannot reach a DUO server: start-up
refuses a pool that cannot hold one ``max_model_len`` request (tests/duo_vllm/kv_cache), so such a
request is one longer than the model, the first case here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.server import vllm_server

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 2048
POOL_BYTES = 96 * 2**20
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def server(smollm2):
    duo = {"duo": {"sparsity": 0.5, "sink": 16, "recent": 64}}  # the shipped SmolLM2 pattern
    with vllm_server(smollm2, "--attention-backend", "DUO", "--additional-config", json.dumps(duo),
                     "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
                     "--kv-cache-memory-bytes", str(POOL_BYTES), "--max-num-seqs", "16",
                     # the legacy variable would override the pool; a bounded oneDNN primitive cache keeps the
                     # worker's memory flat under varied batch sizes (README, "Serving")
                     env={"VLLM_CPU_KVCACHE_SPACE": None, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}) as srv:
        yield srv
        assert "Traceback" not in srv.log_text(), srv.log_tail()


@pytest.fixture(scope="module")
def model(server):
    return server.client().models.list().data[0].id


def post(server, path: str, body: bytes, timeout: float = 120) -> tuple[int, str]:
    request = urllib.request.Request(server.base_url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def completion(server, **body) -> tuple[int, str]:
    return post(server, "/completions", json.dumps(body).encode())


def still_serves(server, model) -> None:
    code, text = completion(server, model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert code == 200, text
    assert json.loads(text)["choices"][0]["text"]


def long_prompt(smollm2_tokenizer, n: int) -> list[int]:
    from duo_vllm.testing.haystack import haystack_tokens

    return haystack_tokens(smollm2_tokenizer, n)


def test_prompt_longer_than_the_model(server, model, smollm2_tokenizer):
    code, text = completion(server, model=model, prompt=long_prompt(smollm2_tokenizer, MAX_MODEL_LEN + 10), max_tokens=4)
    assert code == 400, text
    assert "maximum context length" in text or str(MAX_MODEL_LEN) in text, text
    still_serves(server, model)


def test_max_tokens_past_the_model_length(server, model, smollm2_tokenizer):
    """vLLM 0.32 stops such a request at the model length (finish "length") instead of refusing it;
    either is clean, running past ``max_model_len`` is not."""
    code, text = completion(server, model=model, prompt=long_prompt(smollm2_tokenizer, MAX_MODEL_LEN - 100),
                            max_tokens=500, ignore_eos=True)
    if code == 200:
        answer = json.loads(text)
        assert answer["usage"]["total_tokens"] == MAX_MODEL_LEN, answer["usage"]
        assert answer["choices"][0]["finish_reason"] == "length"
    else:
        assert code == 400, text
    still_serves(server, model)


@pytest.mark.parametrize("bad", [
    {"logprobs": 1000},  # over vLLM's max_logprobs
    {"logprobs": -1},
    {"n": 0},
    {"n": "two"},
    {"stop": 12},
    {"stop": [1, 2]},
    {"temperature": -1},
    {"max_tokens": -3},
], ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items()))
def test_invalid_sampling_values(server, model, bad):
    code, text = completion(server, **{"model": model, "prompt": "Hello", "max_tokens": 4, **bad})
    assert 400 <= code < 500, f"{bad}: {code} {text[:300]}"
    still_serves(server, model)


@pytest.mark.parametrize("body", [
    b'{"model": "m", "prompt": "\xff\xfe not utf-8", "max_tokens": 2}',
    b'{"model": "m", "prompt": "trunc',
    b'',
    b'[1, 2, 3]',
], ids=["non-utf8", "truncated", "empty", "not-an-object"])
def test_malformed_bodies(server, model, body):
    code, text = post(server, "/completions", body.replace(b'"m"', json.dumps(model).encode()))
    assert 400 <= code < 500, f"{body!r}: {code} {text[:300]}"
    still_serves(server, model)


def test_unknown_model(server, model):
    code, text = completion(server, model="no-such-model", prompt="Hello", max_tokens=2)
    assert code == 404, text
    still_serves(server, model)


def test_connection_dropped_during_prefill(server, model, smollm2_tokenizer):
    """The client sends a near-max-length prompt and hangs up at once: the request is aborted,
    its blocks come back and the server keeps serving."""
    body = json.dumps({"model": model, "prompt": long_prompt(smollm2_tokenizer, MAX_MODEL_LEN - 64),
                       "max_tokens": 32}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.3)  # the request reaches the engine before the hang-up
    still_serves(server, model)
    assert drained(server), "KV blocks still in use after the dropped requests"


def drained(server, timeout: float = 60) -> bool:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _load_server import engine_figures, idle

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if idle(engine_figures(server.root_url)):
            return True
        time.sleep(1)
    return False


def test_duo_figures_on_metrics(server):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _load_server import read_metrics

    m = read_metrics(server.root_url)
    assert m["duo:pattern_info"] == 1
    assert 0.3 < m["duo:retrieval_ratio"] < 0.7  # sparsity 0.5
    assert m["duo:stock_bytes_per_token"] == 2 * m["duo:retrieval_bytes_per_token"] == 30 * 3 * 64 * 2 * 4
    assert m["duo:streaming_bytes_per_request"] > 0
    assert 1.5 < m["duo:capacity_ratio"] <= 2.0


def test_load_script_at_ci_scale(server, smollm2, tmp_path):
    """benchmarks/serve_load.py: 8 clients, one round of the whole mix (21 requests: long prompts,
    streams, n=2, seeds, multi-turn, disconnects, aborts, greedy probes): no 5xx, none lost, probes
    equal, pool drained."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--server", server.base_url,
         "--server-pid", str(server.process.pid), "--tokenizer", smollm2, "--clients", "8", "--requests", "21",
         "--duration", "240", "--max-model-len", str(MAX_MODEL_LEN), "--progress-every", "12", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _load_mix import KINDS

    r = json.loads((tmp_path / "serve_load.json").read_text())
    assert r["sent"] == 21 and r["completed"] + r["aborted"] + r["4xx"] == 21
    assert {kind: sum(n.values()) for kind, n in r["by_kind"].items()} == KINDS  # the whole mix, once
    assert r["5xx"] == r["lost"] == 0 and not r["probe_mismatches"]
    assert r["kv_usage_end"] == r["kv_usage_start"] == 0
    assert r["rss_mib_end"] is not None and r["rss_mib_end"] <= 1.10 * r["rss_mib_start"]


def test_load_verdict_fails_on_memory_growth():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_load import verdict

    clean = {"5xx": 0, "lost": 0, "errors": [], "probe_mismatches": [], "probes_equal_after_load": True,
             "kv_usage_start": 0.0, "kv_usage_end": 0.0, "running_end": 0, "waiting_end": 0,
             "rss_mib_start": 1000.0, "rss_mib_end": 1090.0, "settings": {"max_rss_growth": 0.10}}
    assert verdict(clean) == []
    grown = {**clean, "rss_mib_end": 1150.0}
    assert "server memory grew 15.0% (1000.0 -> 1150.0 MiB)" in verdict(grown)[0]
    assert verdict({**grown, "settings": {"max_rss_growth": 0}}) == []  # 0: no check
    assert verdict({**grown, "rss_mib_end": None}) == []  # not measured (a remote server without --server-pid)


def test_eval_scores_the_running_server(server, smollm2, tmp_path, capsys):
    """``python -m duo_vllm.eval --server``: the same tasks through the ``openai`` client, filed under
    the name given; SmolLM2 with DUO finds a 1K-token needle at both ends of the context."""
    from duo_vllm.eval.cli import main

    out = tmp_path / "eval"
    assert main(["needle,vartrack", "--server", server.base_url, "--backends", "duo-served", "--model", smollm2,
                 "--lengths", "1K", "--depths", "2", "--samples", "1", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["settings"]["server"] == server.base_url
    assert [(x["backend"], x["task"], x["prompt_tokens"]) for x in r["records"]] == [
        ("duo-served", "needle", 1024), ("duo-served", "needle", 1024), ("duo-served", "vartrack", 1024)]
    assert r["scores"]["duo-served"]["needle"] >= 50
    assert "duo-served" in capsys.readouterr().out


def test_eval_names_the_fix_when_the_server_refuses_a_prompt(server, smollm2, tmp_path, capsys):
    """A length the server cannot take (past its --max-model-len) ends the eval with one line."""
    from duo_vllm.eval.cli import main

    assert main(["needle", "--server", server.base_url, "--model", smollm2, "--lengths", "3K", "--depths", "1",
                 "--samples", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the server refused a 3072-token needle prompt (HTTP 400" in err, err
    assert "--max-model-len of at least 3096" in err and len(err.splitlines()) == 1, err


def test_throughput_script_measures_the_running_server(server, smollm2, tmp_path):
    """benchmarks/serve_throughput.py (vLLM's own `vllm bench serve` per request rate) against the
    module's server: every request completes, the figures and the PNG are written."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_throughput.py"), "--server", server.base_url,
         "--backends", "duo", "--model", smollm2, "--input-len", "300", "--output-len", "8",
         "--num-prompts", "6", "--rates", "inf", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "serve_throughput.json").read_text())
    figures = r["runs"]["duo"]["inf"]
    assert figures["completed"] == 6 and figures["failed"] == 0
    assert figures["total_output_tokens"] >= 6 * 6  # outputs drawn from 8 * (1 +- 0.33), EOS ignored
    assert figures["output_throughput"] > 0 and figures["p99_ttft_ms"] >= figures["median_ttft_ms"] > 0
    assert 0 < figures["peak_kv_cache_usage"] <= 1
    assert r["vllm"] and r["device"] == "cpu" and "serve_throughput.py" in r["command"]
    assert (tmp_path / "serve_throughput.png").stat().st_size > 0
    # a running server's capacity is not the script's to read; one it starts is read from this same log line
    assert r["kv_tokens"] == {"duo": None} and r["mix_tokens"] == 6 * (300 + 8)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_throughput import kv_tokens_from_log

    assert kv_tokens_from_log(server.log_text()) > 0, server.log_tail()
