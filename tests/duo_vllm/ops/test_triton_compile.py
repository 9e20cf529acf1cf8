"""The CUDA path's Triton kernels compile for Hopper and Ampere, checked without a GPU.

tests/helpers/triton_aot.py records every launch the wrappers make (decode, split decode with
its merge, prefill, the fused KV store; bf16 on GQA, MHA, a group of 5 and head size 80, fp16 on
GQA, FP8 caches) and compiles each with Triton's ahead-of-time compiler for sm_90 and sm_80. It
runs in child processes because this suite runs Triton in its interpreter (tests/conftest.py), one
shard of the configurations per core (compiling is single-threaded).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the test extra installs triton (and its ptxas)")

pytestmark = pytest.mark.slow
KERNELS = ("_lambda_paged_attention_kernel", "_lambda_decode_split_kernel", "_merge_splits_kernel",
           "_store_kv_kernel")


def test_every_launched_configuration_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[3]
    shards = max(1, min(4, os.cpu_count() or 1))
    runs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.triton_aot", "--shard", f"{i}/{shards}"],
                             cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(shards)]
    outputs = [run.communicate(timeout=1200) for run in runs]  # every shard ends before any verdict
    lines = []
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stdout[-3000:] + stderr[-6000:]
        lines += stdout.splitlines()
    assert sum(line.startswith("compiled shard ") for line in lines) == shards
    for arch in ("sm_90", "sm_80"):
        for kernel in KERNELS:
            assert any(line.startswith(f"{arch} {kernel} ") for line in lines), f"{kernel} not compiled for {arch}"
    # the split decode ran with two split counts: two merge configurations per shape in bf16 (4), fp16 (1)
    assert sum(line.startswith("sm_90 _merge_splits_kernel ") for line in lines) >= 2 * (4 + 1)
