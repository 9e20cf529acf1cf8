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


def test_post_processing_a_reordered_model_again_is_refused():
    """vLLM 0.34's direct reload writes checkpoint-order weights into the live model and runs the
    post-load step again: with heads already reordered, that must stop with the fix, not skip the
    layers and serve them with the wrong heads. (Every engine test loads a model through this
    step once, with no refusal.)"""
    import pytest
    import torch
    from vllm.model_executor.model_loader import utils

    from duo_vllm.head_order import REORDERED_FLAG

    duo_vllm.register()
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    setattr(model[0], REORDERED_FLAG, True)
    with pytest.raises(ValueError, match='reorder_heads": false'):
        utils.process_weights_after_loading(model, SimpleNamespace(), torch.device("cpu"))
