"""The CUDA path's Triton kernels compile for Hopper and Ampere, checked without a GPU.

tests/helpers/triton_aot.py records every launch the wrappers make (decode, split decode with
its merge, prefill, the fused KV store; bf16 and fp32; GQA, MHA, a group of 5, head size 80) and
compiles each with Triton's ahead-of-time compiler for sm_90 and sm_80. It runs in a child
process because this suite runs Triton in its interpreter (tests/conftest.py).
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
    run = subprocess.run([sys.executable, "-m", "tests.helpers.triton_aot"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    lines = run.stdout.splitlines()
    for arch in ("sm_90", "sm_80"):
        for kernel in KERNELS:
            assert any(line.startswith(f"{arch} {kernel} ") for line in lines), f"{kernel} not compiled for {arch}"
    # the split decode ran with two split counts: two merge configurations per dtype and shape
    assert sum(line.startswith("sm_90 _merge_splits_kernel ") for line in lines) >= 2 * 4 * 2
