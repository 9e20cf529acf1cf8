"""Shared fixtures: the vLLM test environment, the SmolLM2 test model and its tokenizer."""

from __future__ import annotations

import os

# Triton decides interpreted vs compiled for every @triton.jit function, its own standard library
# (tl.zeros, ...) included, when that code is first imported: the CUDA path's kernels can only run
# in the CPU interpreter (tests/duo_vllm/ops/test_triton_streaming.py) if this is set before
# anything (vLLM included) imports triton. vLLM's CPU backend does not use Triton either way.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers.engine import apply_vllm_env  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def vllm_env() -> dict[str, str]:
    """Environment defaults every vLLM engine needs here (see tests/helpers/engine.py)."""
    return apply_vllm_env()


@pytest.fixture(scope="session")
def smollm2() -> str:
    """Folder of SmolLM2-135M-Instruct as bf16 safetensors (converted once, then cached)."""
    from duo_vllm.testing.models import smollm2_path

    return str(smollm2_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)
