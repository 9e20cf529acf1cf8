"""The supported vLLM range, and standing aside outside it: stock vLLM must keep working.

vLLM runs plugins in every process with no error handling, so a plugin that raises breaks every
vLLM command in the environment. These tests make a patch target disappear, or vLLM report a
release outside the range, in every process of a subprocess (tests/helpers/vllm_surgery.py).
"""

from __future__ import annotations

import json

import pytest

from duo_vllm.vllm_support import INSTALL_HINT, parse_minor, unsupported_reason
from tests.helpers.vllm_surgery import run_edited

WARNING = "DUO attention backend not available"
# A target of the last patch duo_vllm.patches applies: every earlier one must be undone.
MISSING = "vllm.v1.core.kv_cache_utils:get_kv_cache_groups"


@pytest.mark.parametrize("version, minor", [
    ("0.32.0", (0, 32)), ("0.32.0+cpu", (0, 32)), ("0.33.1rc2", (0, 33)), ("v0.34.0", (0, 34)),
    ("1.0.0.dev3+gabc", (1, 0)), ("dev", None), ("", None),
])
def test_parse_minor(version, minor):
    assert parse_minor(version) == minor


@pytest.mark.parametrize("version, platform", [
    ("0.32.0", "cuda"), ("0.33.0", "cuda"), ("0.34.2", "cuda"), ("0.32.0+cpu", "cpu")])
def test_served_releases(version, platform):
    assert unsupported_reason(version, platform) is None


@pytest.mark.parametrize("version, platform, expected", [
    ("0.35.0", "cuda", INSTALL_HINT["cuda"]),
    ("0.31.2", "cuda", INSTALL_HINT["cuda"]),
    ("0.33.0", "cpu", INSTALL_HINT["cpu"]),
    ("dev", "cuda", "this is vLLM dev"),
    ("0.33.0", "rocm", "platform is 'rocm'"),
])
def test_unserved_releases_name_the_fix(version, platform, expected):
    reason = unsupported_reason(version, platform)
    assert reason is not None and expected in reason


_PROBE = """
import json, logging, sys
from vllm.plugins import load_general_plugins
load_general_plugins()
load_general_plugins()  # plugins load more than once in some processes
import duo_vllm
from duo_vllm.patches.wrapping import MARK, applied
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.attention.attention import Attention
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum
out = {"path": AttentionBackendEnum["DUO"].get_path(),
       "patched": sorted(f"{getattr(o, '__name__', o)}.{n}" for o, n in applied()),
       "attention_init_wrapped": getattr(Attention.__init__, MARK, False),
       "cpu_platform_wrapped": getattr(CpuPlatform.get_attn_backend_cls, MARK, False)}
model = sys.argv[1]
stock = EngineArgs(model=model, max_model_len=512).create_engine_config()
out["stock_backend"] = str(stock.attention_config.backend)
try:
    EngineArgs(model=model, max_model_len=512, attention_backend="DUO").create_engine_config()
    out["duo_error"] = None
except Exception as exc:
    out["duo_error"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out))
"""


def _result(proc) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("edit", [
    pytest.param({"hide": (MISSING,)}, id="missing-symbol"),
    pytest.param({"version": "0.35.0"}, id="newer-vllm"),
])
def test_stands_aside_with_one_warning(smollm2, edit):
    proc = run_edited(["python", "-c", _PROBE, smollm2], timeout=300, **edit)
    out = _result(proc)
    log = proc.stdout + proc.stderr
    assert log.count(WARNING) == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert out["path"] == "duo_vllm.unavailable.DuoUnavailableBackend"
    # Nothing of DUO stays patched in, but the front-end refusal of DUO itself.
    assert out["patched"] == ["EngineArgs.create_engine_config"]
    assert not out["attention_init_wrapped"] and not out["cpu_platform_wrapped"]
    assert out["stock_backend"] == "None"
    error = out["duo_error"]
    assert error is not None and error.startswith("DuoUnavailableError: --attention-backend DUO is not available")
    if "hide" in edit:
        assert "get_kv_cache_groups" in error and "could not attach to vLLM 0.32.0" in error
    else:
        assert "this is vLLM 0.35.0" in error and INSTALL_HINT["cpu"] in error


def test_vllm_command_works_beside_an_unserved_release():
    """`vllm --version` loads plugins too: it must print vLLM's version, not a traceback."""
    proc = run_edited(["python", "-m", "vllm.entrypoints.cli.main", "--version"], version="0.35.0", timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert parse_minor(proc.stdout.strip().splitlines()[-1]) is not None, proc.stdout  # the CLI reads pip's metadata
    assert log.count(WARNING) == 1 and "Traceback" not in log, log[-3000:]


_STOCK_SERVING = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0)
out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
print("RESULT " + json.dumps({"tokens": list(out[0].outputs[0].token_ids)}))
llm.llm_engine.engine_core.shutdown()
"""


@pytest.mark.slow
def test_stock_vllm_serves_when_a_patch_target_is_missing(smollm2, smollm2_tokenizer):
    """One real engine (engine core in its own process, which loads plugins again): greedy tokens
    equal transformers', one warning in all processes together, no traceback."""
    import torch
    from transformers import AutoModelForCausalLM

    proc = run_edited(["python", "-c", _STOCK_SERVING, smollm2], hide=(MISSING,), timeout=600)
    out = _result(proc)
    log = proc.stdout + proc.stderr
    assert log.count(WARNING) == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).eval()
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=smollm2_tokenizer.eos_token_id)
    assert out["tokens"] == ref[0, ids.shape[1]:].tolist()


def test_attach_check_passes_on_the_installed_vllm():
    """scripts/check_vllm_attach.py is how the 0.33/0.34 attach points are checked without a GPU;
    here it runs on CI's vLLM (0.32 CPU build), so it cannot rot unnoticed."""
    proc = run_edited(["python", "scripts/check_vllm_attach.py"], timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "every patch applied and in place" in proc.stdout
