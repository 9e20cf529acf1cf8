"""The vLLM patches are idempotent, select DUO only when asked, and survive spawned processes."""

from __future__ import annotations

import pickle
import subprocess
import sys
from types import SimpleNamespace

import duo_vllm
from duo_vllm import BACKEND_CLASS_PATH


def _selector(**overrides):
    return SimpleNamespace(use_mla=False, use_sparse=False, **overrides)


def test_register_is_reentrant():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    duo_vllm.register()
    first = CpuPlatform.get_attn_backend_cls
    duo_vllm._registered = False  # force a second full registration
    import duo_vllm.patches as patches

    patches._applied = False
    duo_vllm.register()
    assert CpuPlatform.get_attn_backend_cls.__func__ is first.__func__, "the CPU patch was stacked twice"
    assert AttentionBackendEnum["DUO"].get_path() == BACKEND_CLASS_PATH


def test_cpu_platform_returns_duo_only_when_requested():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    duo_vllm.register()
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["DUO"], _selector()) == BACKEND_CLASS_PATH
    stock = AttentionBackendEnum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, _selector()) == stock
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, _selector()) == stock


def test_duo_member_unpickles_in_a_fresh_process():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    duo_vllm.register()
    payload = pickle.dumps({"backend": AttentionBackendEnum["DUO"], "stock": AttentionBackendEnum.CPU_ATTN})
    code = ("import pickle, sys; d = pickle.loads(sys.stdin.buffer.read()); "
            "print(d['backend'].name, d['backend'].get_path(), d['stock'].name)")
    out = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["DUO", BACKEND_CLASS_PATH, "CPU_ATTN"]
