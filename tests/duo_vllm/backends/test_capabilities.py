"""The CUDA capability table (``duo_vllm.backends.capabilities``) with the platform's answers
faked: GPU generation x FlashAttention version x KV-cache dtype, each either the kernels DUO runs
or one start-up message naming what does run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from duo_vllm.backends import capabilities
from duo_vllm.backends.capabilities import (
    FLASHINFER_BLOCK_SIZES,
    FORCE_FA2,
    FORCE_FLASH_ATTN,
    FORCE_FLASHINFER,
    check_cuda_kernels,
    check_head_slots,
    cuda_kernels,
    engine_backend,
    selected_backend,
)
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


# ---------------------------------------------------------------- FLASHINFER (DUO option "kernel")


@pytest.mark.parametrize(("option", "card", "backend"), [
    ("auto", HOPPER, "flash_attn"), ("auto", AMPERE, "flash_attn"), ("auto", ADA, "flash_attn"),
    ("auto", (12, 0), "flash_attn"), ("auto", BLACKWELL, "flashinfer"), ("auto", (10, 3), "flashinfer"),
    ("flashinfer", HOPPER, "flashinfer"), ("flash_attn", BLACKWELL, "flash_attn"),
])
def test_auto_follows_vllms_first_choice_and_an_option_overrides_it(option, card, backend):
    """vLLM's CUDA priorities put FLASHINFER first on compute capability 10.x only."""
    assert selected_backend(option, card) == backend
    # where FlashInfer cannot run, vLLM takes its next choice, and so does "auto"; an option stays
    assert selected_backend(option, card, flashinfer_available=False) == (option if option != "auto" else "flash_attn")


def test_flashinfer_that_cannot_run_is_refused_in_one_line():
    with pytest.raises(DuoConfigError, match="FLASHINFER backend, which cannot run here") as info:
        cuda_kernels(HOPPER, None, "auto", "flashinfer", 16, 128, flashinfer_available=False)
    assert FORCE_FLASH_ATTN in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("card", [AMPERE, ADA, HOPPER, BLACKWELL, (12, 1)])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "fp8"])
def test_flashinfer_rows_say_what_runs_and_that_no_gpu_has_run_them(card, dtype):
    kernels = cuda_kernels(card, None, dtype, "flashinfer", 16)
    assert kernels.backend == "flashinfer" and kernels.retrieval.startswith("FlashInfer (FLASHINFER)")
    assert ("FP8" in kernels.retrieval) == (dtype == "fp8")
    assert kernels.streaming == "Triton Λ kernels" and "not yet run on a GPU" in kernels.line()


@pytest.mark.parametrize("card", [(12, 2), (13, 0)])
def test_flashinfer_outside_vllms_range_names_flash_attn(card):
    with pytest.raises(DuoConfigError, match="8.0 to 12.1") as info:
        cuda_kernels(card, None, "auto", "flashinfer")
    assert FORCE_FLASH_ATTN in str(info.value) and "\n" not in str(info.value)


def test_flashinfer_before_ampere_is_refused_as_every_kernel_is():
    with pytest.raises(DuoConfigError, match="8.0 or newer"):
        cuda_kernels(TURING, None, "auto", "flashinfer")


@pytest.mark.parametrize("block_size", [1, 8, 128, 256])
def test_flashinfer_takes_its_own_page_sizes_only(block_size):
    with pytest.raises(DuoConfigError, match="--block-size 16, 32 or 64") as info:
        cuda_kernels(HOPPER, None, "auto", "flashinfer", block_size)
    assert f"got {block_size}" in str(info.value) and FORCE_FLASH_ATTN in str(info.value)
    for fine in FLASHINFER_BLOCK_SIZES:
        assert cuda_kernels(HOPPER, None, "auto", "flashinfer", fine).backend == "flashinfer"


@pytest.mark.parametrize("head_size", [80, 96, 192])
def test_flashinfer_takes_its_own_head_sizes_only(head_size):
    with pytest.raises(DuoConfigError, match="head sizes 64, 128, 256 and 512") as info:
        cuda_kernels(HOPPER, None, "auto", "flashinfer", 16, head_size)
    assert f"this model's is {head_size}" in str(info.value) and FORCE_FLASH_ATTN in str(info.value)
    assert cuda_kernels(HOPPER, 2, "auto", "flash_attn", 16, head_size).backend == "flash_attn"


def test_fa4_refusal_names_flashinfer_too():
    with pytest.raises(DuoConfigError) as info:
        cuda_kernels(BLACKWELL, 4, "auto")
    assert FORCE_FA2 in str(info.value) and FORCE_FLASHINFER in str(info.value)


def _config(duo: dict, block_size=None, head_size=128):
    from vllm.config import VllmConfig

    config = VllmConfig()
    config.model_config = SimpleNamespace(get_head_size=lambda: head_size)
    config.cache_config.cache_dtype = "auto"
    config.cache_config.block_size = block_size
    config.additional_config = {"duo": duo}
    return config


def test_the_front_end_check_reads_the_kernel_option_and_asks_flash_attn_nothing(monkeypatch):
    import vllm.platforms
    from vllm.v1.attention.backends import fa_utils

    def not_asked(**_):
        raise AssertionError("FLASH_ATTN's version was asked for an engine on FLASHINFER")

    monkeypatch.setattr(fa_utils, "get_flash_attn_version", not_asked)
    monkeypatch.setattr(vllm.platforms.current_platform, "get_device_capability",
                        lambda *a, **k: SimpleNamespace(major=9, minor=0))
    # vLLM's has_flashinfer() as on a GPU machine with FlashInfer (this CPU machine has none)
    monkeypatch.setattr(capabilities, "flashinfer_usable", lambda: True)
    assert check_cuda_kernels(_config({"kernel": "flashinfer"})).backend == "flashinfer"
    with pytest.raises(DuoConfigError, match="--block-size 16, 32 or 64"):
        check_cuda_kernels(_config({"kernel": "flashinfer"}, block_size=128))
    with pytest.raises(DuoConfigError, match="this model's is 80"):
        check_cuda_kernels(_config({"kernel": "flashinfer"}, head_size=80))
    # Blackwell with no option: vLLM's own choice there, FLASHINFER
    monkeypatch.setattr(vllm.platforms.current_platform, "get_device_capability",
                        lambda *a, **k: SimpleNamespace(major=10, minor=0))
    assert check_cuda_kernels(_config({})).backend == "flashinfer"
    assert engine_backend(_config({})) == "flashinfer"
    assert engine_backend(_config({"kernel": "flash_attn"})) == "flash_attn"
    # no FlashInfer that can run: "auto" takes FLASH_ATTN, as vLLM does; the option is refused by name
    monkeypatch.setattr(capabilities, "flashinfer_usable", lambda: False)
    assert engine_backend(_config({})) == "flash_attn"
    with pytest.raises(DuoConfigError, match="cannot run here"):
        check_cuda_kernels(_config({"kernel": "flashinfer"}))


@pytest.mark.parametrize("answer", [True, False])
def test_flashinfer_usable_is_vllms_answer(monkeypatch, answer):
    import vllm.utils.flashinfer

    monkeypatch.setattr(vllm.utils.flashinfer, "has_flashinfer", lambda: answer)
    assert capabilities.flashinfer_usable() is answer


def test_engine_backend_without_a_gpu_keeps_the_option(monkeypatch):
    import vllm.platforms

    monkeypatch.setattr(vllm.platforms.current_platform, "get_device_capability", lambda *a, **k: None)
    assert engine_backend(None) == "flash_attn"
    assert engine_backend(_config({})) == "flash_attn"
    assert engine_backend(_config({"kernel": "flashinfer"})) == "flashinfer"


def test_flashinfer_refuses_tensor_parallel_head_padding():
    """A layer whose ranks hold different retrieval counts pads the smaller rank's cache; FLASHINFER
    would plan the padded count for it."""
    import numpy as np

    from duo_vllm.config import DuoConfig
    from duo_vllm.runtime import DuoRuntime

    def runtime(mask, tp):
        return DuoRuntime(DuoConfig(), pattern=None, sparsity=None, retrieval_mask=np.array(mask), tp_size=tp, tp_rank=0)

    on_flashinfer = cuda_kernels(HOPPER, None, "auto", "flashinfer")
    on_fa3 = cuda_kernels(HOPPER, 3, "auto")
    uneven = runtime([[True, True, False, False]], 2)  # rank 0: 2 retrieval heads, rank 1: none
    with pytest.raises(DuoConfigError, match="2 head slots of padding at TP 2") as info:
        check_head_slots(on_flashinfer, uneven)
    assert FORCE_FLASH_ATTN in str(info.value)
    check_head_slots(on_fa3, uneven)  # FLASH_ATTN runs padded caches (measured on 2 H200s)
    check_head_slots(None, uneven)
    check_head_slots(on_flashinfer, runtime([[True, False, True, False]], 2))  # one each: no padding
    check_head_slots(on_flashinfer, runtime([[True, True, False, False]], 1))


@pytest.mark.parametrize("value", ["fa3", "FLASHINFER", "", None, 2])
def test_an_unknown_kernel_option_lists_the_valid_ones(value):
    from duo_vllm.config import DuoConfig

    with pytest.raises(DuoConfigError, match="must be one of \\['auto', 'flash_attn', 'flashinfer'\\]"):
        DuoConfig.from_additional_config({"duo": {"kernel": value}})
