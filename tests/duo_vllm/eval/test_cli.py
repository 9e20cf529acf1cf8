"""``python -m duo_vllm.eval``: every bad argument fails with one line before any engine starts."""

import socket
import subprocess
import sys

import pytest

from duo_vllm.eval.cli import build_parser, main, parse_length


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("argv, message", [
    (["haystack", "--model", "smollm2"], "unknown task(s) ['haystack']"),
    (["needle", "--model", "smollm2", "--backends", "duo,h2o"], "unknown backend(s) ['h2o']"),
    (["needle", "--model", "/nonexistent/model"], "is not a model folder"),
    (["needle"], "give --model (offline), or --server URL"),
    (["needle", "--model", "smollm2", "--lengths", "4Q"], "bad length '4Q'"),
    (["needle", "--model", "smollm2", "--depths", "0"], "must be at least 1"),
    (["needle", "--model", "smollm2", "--duo", "{sparsity: 0.5}"], "--duo is not valid JSON"),
    (["needle", "--model", "smollm2", "--duo", '{"sparsity": 1.5}'], '"sparsity" must be a number in [0, 1]'),
    (["needle", "--model", "smollm2", "--duo", '{"colour": 1}'], "Unknown DUO option(s) ['colour']"),
    (["needle", "--model", "smollm2", "--lengths", "64K"], "more than SmolLM2-135M-Instruct's 8192-token context"),
    (["needle", "--server", "http://127.0.0.1:1/v1", "--backends", "duo,stock"], "names the one setting"),
])
def test_bad_arguments_fail_in_one_line(argv, message, tmp_path, capsys, smollm2):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_unreachable_server(tmp_path, capsys):
    url = f"http://127.0.0.1:{_refused_port()}/v1"
    assert main(["needle", "--server", url, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach an OpenAI-compatible server at {url}" in err and len(err.strip().splitlines()) == 1


def test_other_runs_results_are_not_mixed_in(tmp_path, capsys, smollm2):
    (tmp_path / "run.json").write_text('{"model": "other", "seed": 0}')
    (tmp_path / "records.jsonl").write_text("")
    assert main(["needle", "--model", "smollm2", "--backends", "stock", "--lengths", "512", "--out", str(tmp_path)]) == 2
    assert "holds results of another run" in capsys.readouterr().err


def test_lengths():
    assert parse_length("4K") == 4096 and parse_length("1536") == 1536 and parse_length("0.5k") == 512


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "duo_vllm.eval", "--help"], capture_output=True, text=True, check=True)
    for action in build_parser()._actions:
        assert action.help, action.option_strings
        for option in action.option_strings:
            assert option in out.stdout
    for word in ("needle", "multikey", "multivalue", "multiquery", "vartrack", "commonwords", "control",
                 "stock", "streaming", "inverse", "random"):
        assert word in out.stdout


def test_cpu_engines_get_a_bounded_kv_cache_unless_sized(monkeypatch):
    from duo_vllm.eval.cli import CPU_KV_CACHE_BYTES, with_cpu_kv_default

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert with_cpu_kv_default({"dtype": "float32"}) == {"dtype": "float32", "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
    assert with_cpu_kv_default({"kv_cache_memory_bytes": 123}) == {"kv_cache_memory_bytes": 123}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert with_cpu_kv_default({}) == {}
