"""The CUDA capability table (``duo_vllm.backends.capabilities``) with the platform's answers
faked: GPU generation x FlashAttention version x KV-cache dtype, each either the kernels DUO runs
or one start-up message naming what does run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from duo_vllm.backends.capabilities import FORCE_FA2, check_cuda_kernels, cuda_kernels
from duo_vllm.config import DuoConfigError

HOPPER, AMPERE, ADA, BLACKWELL, TURING = (9, 0), (8, 0), (8, 9), (10, 0), (7, 5)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "fp8", "fp8_e4m3"])
def test_hopper_runs_fa3_with_every_kv_dtype(dtype):
    kernels = cuda_kernels(HOPPER, 3, dtype)
    assert kernels.retrieval.startswith("FlashAttention 3")
    assert ("FP8" in kernels.retrieval) == dtype.startswith("fp8")
    assert "measured on H100 and H200" in kernels.line()


@pytest.mark.parametrize("card", [AMPERE, ADA, HOPPER, BLACKWELL])
def test_fa2_runs_unquantized_kv_and_says_how_far_it_is_checked(card):
    kernels = cuda_kernels(card, 2, "auto")
    assert kernels.retrieval.startswith("FlashAttention 2") and "speed not yet measured" in kernels.line()
    assert f"compute capability {card[0]}.{card[1]}" in kernels.line()


@pytest.mark.parametrize("card", [AMPERE, ADA, HOPPER])
def test_fp8_without_fa3_names_fa3_and_the_dtype_that_runs(card):
    with pytest.raises(DuoConfigError, match="needs FlashAttention 3") as info:
        cuda_kernels(card, 2, "fp8")
    assert "--kv-cache-dtype auto" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", ["auto", "fp8"])
def test_a_version_duo_has_not_run_names_the_override(dtype):
    with pytest.raises(DuoConfigError, match="FlashAttention 4") as info:
        cuda_kernels(BLACKWELL, 4, dtype)
    assert FORCE_FA2 in str(info.value)
    assert ("--kv-cache-dtype auto" in str(info.value)) == (dtype == "fp8")


def test_cards_before_ampere_are_refused():
    with pytest.raises(DuoConfigError, match="8.0 or newer"):
        cuda_kernels(TURING, 2, "auto")


def test_the_front_end_check_reads_a_forced_version(monkeypatch):
    """FLASH_ATTN's choice is asked under the engine's config (a forced flash_attn_version lives
    there); no GPU visible to the process means no check."""
    import vllm.platforms
    from vllm.config import VllmConfig, get_current_vllm_config_or_none
    from vllm.v1.attention.backends import fa_utils

    config = VllmConfig()
    config.model_config = SimpleNamespace(get_head_size=lambda: 128)
    config.cache_config.cache_dtype = "auto"
    asked = []

    def version(head_size=None, **_):
        asked.append((head_size, get_current_vllm_config_or_none()))
        return 2

    monkeypatch.setattr(fa_utils, "get_flash_attn_version", version)
    platform = vllm.platforms.current_platform
    monkeypatch.setattr(platform, "get_device_capability", lambda *a, **k: SimpleNamespace(major=9, minor=0))
    assert check_cuda_kernels(config).retrieval.startswith("FlashAttention 2")
    assert asked == [(128, config)]
    monkeypatch.setattr(platform, "get_device_capability", lambda *a, **k: None)
    assert check_cuda_kernels(config) is None


def test_a_failing_probe_never_stops_start_up(monkeypatch):
    """Asking FLASH_ATTN for its version in the front-end is a courtesy: if that raises, the
    engine starts and decides as stock does."""
    import vllm.platforms
    from vllm.config import VllmConfig
    from vllm.v1.attention.backends import fa_utils

    def broken(**_):
        raise RuntimeError("no driver in this process")

    config = VllmConfig()
    config.model_config = SimpleNamespace(get_head_size=lambda: 128)
    monkeypatch.setattr(fa_utils, "get_flash_attn_version", broken)
    monkeypatch.setattr(vllm.platforms.current_platform, "get_device_capability",
                        lambda *a, **k: SimpleNamespace(major=9, minor=0))
    assert check_cuda_kernels(config) is None
