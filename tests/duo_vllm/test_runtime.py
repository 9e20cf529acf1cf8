"""Tests of duo_vllm.runtime (build_runtime, DuoRuntime) and duo_vllm.backends.head_plan."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from duo_vllm.backends.head_plan import layer_index_from_name, plan_for_layer
from duo_vllm.config import DuoConfig, DuoConfigError
from duo_vllm.fingerprint import model_fingerprint
from duo_vllm.pattern import HeadPattern, PatternError
from duo_vllm.pattern_io import save_pattern
from duo_vllm.runtime import DuoRuntime, build_runtime
from duo_vllm.shipped_patterns import find_shipped_pattern

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
LAYERS, Q_HEADS, KV_HEADS = 30, 9, 3
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": LAYERS,
    "num_attention_heads": Q_HEADS,
    "num_key_value_heads": KV_HEADS,
    "hidden_size": 576,
    "head_dim": 64,
    "vocab_size": 49152,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
}


@pytest.fixture(params=["dict", "namespace"])
def hf_config(request):
    if request.param == "dict":
        return dict(SMOLLM2_CONFIG)
    return SimpleNamespace(**SMOLLM2_CONFIG)


def random_gates(seed=0, shape=(LAYERS, KV_HEADS)):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def saved_pattern(folder, gates, *, hf_config=None, sparsity=None, model_name=MODEL_NAME) -> str:
    pattern = HeadPattern(
        gates=gates,
        model_name=model_name,
        model_fingerprint=model_fingerprint(hf_config) if hf_config is not None else None,
        sparsity=sparsity,
        sink_size=64,
        recent_size=256,
        provenance={"kind": "random gates for tests"},
    )
    save_pattern(pattern, folder)
    return str(folder)


def build(duo: DuoConfig, hf_config, *, model_name=MODEL_NAME, num_layers=LAYERS, kv=KV_HEADS, **kw):
    return build_runtime(duo, hf_config=hf_config, model_name=model_name, num_layers=num_layers,
                         total_kv_heads=kv, **kw)


def check_top_gates(mask, gates):
    """Retrieval heads are exactly the highest gates."""
    if mask.all() or not mask.any():
        return
    assert gates[mask].min() > gates[~mask].max(), "a streaming head has a higher gate than a retrieval head"


# ----------------------------------------------------------------------------- build_runtime


@pytest.mark.parametrize(
    "duo_kwargs,num_streaming,sparsity",
    [
        ({"sparsity": 0.25}, 23, 0.25),  # floor(0.25 * 90 + 0.5)
        ({"sparsity": 0.5}, 45, 0.5),
        ({"sparsity": 0.0}, 0, 0.0),
        ({"sparsity": 1.0}, 90, 1.0),
        ({"retrieval_ratio": 0.2}, 72, 0.8),
        ({}, 36, 0.4),  # the pattern's own sparsity
    ],
)
def test_sparsity_gives_exact_head_count(tmp_path, hf_config, duo_kwargs, num_streaming, sparsity):
    gates = random_gates(1)
    path = saved_pattern(tmp_path / "pat", gates, hf_config=hf_config, sparsity=0.4)
    runtime = build(DuoConfig(pattern=path, **duo_kwargs), hf_config)
    assert isinstance(runtime, DuoRuntime)
    assert runtime.retrieval_mask.shape == (LAYERS, KV_HEADS) and runtime.retrieval_mask.dtype == bool
    assert int((~runtime.retrieval_mask).sum()) == num_streaming, (
        f"{duo_kwargs}: {int((~runtime.retrieval_mask).sum())} streaming heads, expected {num_streaming}"
    )
    assert runtime.sparsity == pytest.approx(sparsity)
    check_top_gates(runtime.retrieval_mask, gates)
    np.testing.assert_array_equal(runtime.pattern.gates, gates, err_msg="saved gates did not round-trip")
    assert (runtime.sink, runtime.recent) == (64, 256)


def test_default_sparsity_when_pattern_has_none(tmp_path, hf_config):
    path = saved_pattern(tmp_path / "pat", random_gates(2), hf_config=hf_config, sparsity=None)
    runtime = build(DuoConfig(pattern=path), hf_config)
    assert runtime.sparsity == 0.5
    assert int((~runtime.retrieval_mask).sum()) == 45


def test_threshold_path(tmp_path, hf_config):
    gates = random_gates(3)
    path = saved_pattern(tmp_path / "pat", gates, hf_config=hf_config, sparsity=0.9)
    runtime = build(DuoConfig(pattern=path, threshold=0.6), hf_config)
    assert runtime.sparsity is None
    np.testing.assert_array_equal(runtime.retrieval_mask, gates >= 0.6, err_msg="threshold mask")
    assert "threshold 0.6" in runtime.summary(1000)


def test_min_retrieval_per_layer(tmp_path, hf_config):
    gates = random_gates(4)
    path = saved_pattern(tmp_path / "pat", gates, hf_config=hf_config)
    runtime = build(DuoConfig(pattern=path, threshold=2.0, min_retrieval_per_layer=1), hf_config)
    assert runtime.retrieval_mask.sum(axis=1).tolist() == [1] * LAYERS
    np.testing.assert_array_equal(runtime.retrieval_mask.argmax(axis=1), gates.argmax(axis=1))
    runtime = build(DuoConfig(pattern=path, sparsity=1.0, min_retrieval_per_layer=2), hf_config)
    assert runtime.retrieval_mask.sum(axis=1).tolist() == [2] * LAYERS


def test_pattern_file_path_works_too(tmp_path, hf_config):
    folder = saved_pattern(tmp_path / "pat", random_gates(5), hf_config=hf_config)
    runtime = build(DuoConfig(pattern=f"{folder}/duo_pattern.json", sparsity=0.5), hf_config)
    assert int(runtime.retrieval_mask.sum()) == 45


@pytest.mark.parametrize("tp_size", [1, 3])
def test_local_retrieval_kv_heads(tmp_path, hf_config, tp_size):
    path = saved_pattern(tmp_path / "pat", random_gates(6), hf_config=hf_config)
    full = build(DuoConfig(pattern=path, sparsity=0.5), hf_config).retrieval_mask
    for rank in range(tp_size):
        runtime = build(DuoConfig(pattern=path, sparsity=0.5), hf_config, tp_size=tp_size, tp_rank=rank)
        per_rank = KV_HEADS // tp_size
        for layer in (0, 12, LAYERS - 1):
            local = runtime.local_retrieval_kv_heads(layer)
            np.testing.assert_array_equal(
                local, full[layer, rank * per_rank : (rank + 1) * per_rank],
                err_msg=f"tp {tp_size} rank {rank} layer {layer}",
            )
    if tp_size == 3:
        runtime = build(DuoConfig(pattern=path, sparsity=0.5), hf_config, tp_size=3, tp_rank=1)
        assert runtime.local_retrieval_kv_heads(7).shape == (1,)
        assert bool(runtime.local_retrieval_kv_heads(7)[0]) == bool(full[7, 1])


# ----------------------------------------------------------------------------- kv_saving / summary


def test_kv_saving(tmp_path, hf_config):
    path = saved_pattern(tmp_path / "pat", random_gates(7), hf_config=hf_config)
    sink, recent = 64, 256
    window = sink + recent
    all_retrieval = build(DuoConfig(pattern=path, sparsity=0.0), hf_config)
    for ctx in (1, window, 10 * window, 100_000):
        assert all_retrieval.kv_saving(ctx) == 0.0, f"all retrieval at {ctx} tokens"
    all_streaming = build(DuoConfig(pattern=path, sparsity=1.0, sink=sink, recent=recent), hf_config)
    assert all_streaming.kv_saving(10 * window) == pytest.approx(0.9)
    assert all_streaming.kv_saving(window) == pytest.approx(0.0)
    assert all_streaming.kv_saving(window // 2) == pytest.approx(0.0), "short contexts save nothing"
    half = build(DuoConfig(pattern=path, sparsity=0.5, sink=sink, recent=recent), hf_config)
    assert half.kv_saving(10 * window) == pytest.approx(0.5 * 0.9)
    assert half.kv_saving(4 * window) == pytest.approx(0.5 * 0.75)


def test_summary(tmp_path, hf_config):
    path = saved_pattern(tmp_path / "pat", random_gates(8), hf_config=hf_config)
    runtime = build(DuoConfig(pattern=path, sparsity=0.5, sink=4, recent=16), hf_config)
    text = runtime.summary(4096)
    counts = runtime.retrieval_mask.sum(axis=1)
    assert "min/mean/max" in text, text
    expected = f"{counts.min()}/{counts.mean():.2f}/{counts.max()} of {KV_HEADS}"
    assert expected in text, f"{expected!r} not in {text!r}"
    assert "sink 4" in text and "recent 16" in text, text
    # the pattern records the window it was trained with (64/256): the line says it differs
    assert "the pattern was trained with sink 64, recent 256" in text, text
    same = build(DuoConfig(pattern=path, sparsity=0.5, sink=64, recent=256), hf_config)
    assert "trained with" not in same.summary(4096)
    assert "sparsity 0.50" in text, text
    assert "4096 tokens" in text, text
    assert path in text, f"pattern source missing: {text}"
    saving = re.search(r"KV saving this pattern implies at 4096 tokens: ([0-9.]+)%", text)
    assert saving and float(saving.group(1)) == pytest.approx(100 * runtime.kv_saving(4096), abs=0.05), text


# ----------------------------------------------------------------------------- errors


def fake_config():
    """A config no shipped pattern can match (odd vocabulary and name)."""
    return dict(SMOLLM2_CONFIG, vocab_size=12347, architectures=["DuoTestForCausalLM"])


FAKE_NAME = "duo-test/NoSuchModel-xq7"


def test_no_pattern_found(tmp_path, monkeypatch):
    empty = tmp_path / "empty_patterns"
    empty.mkdir()
    monkeypatch.setenv("DUO_VLLM_PATTERNS", str(empty))
    cfg = fake_config()
    assert find_shipped_pattern(FAKE_NAME, model_fingerprint(cfg)) is None, "precondition: no shipped match"
    with pytest.raises(PatternError) as info:
        build(DuoConfig(), cfg, model_name=FAKE_NAME)
    message = str(info.value)
    assert "gate_training" in message, message
    assert "--additional-config" in message, message
    assert FAKE_NAME in message and model_fingerprint(cfg) in message, message


def test_shipped_pattern_found_through_env(tmp_path, monkeypatch):
    """The other side of the previous test: a pattern in DUO_VLLM_PATTERNS is picked up by
    fingerprint, and one without a fingerprint by model name."""
    extra = tmp_path / "extra"
    cfg = fake_config()
    gates = random_gates(9)
    saved_pattern(extra / "NoSuchModel-xq7", gates, hf_config=cfg, sparsity=0.5, model_name=FAKE_NAME)
    monkeypatch.setenv("DUO_VLLM_PATTERNS", str(extra))
    runtime = build(DuoConfig(), cfg, model_name=FAKE_NAME)
    np.testing.assert_array_equal(runtime.pattern.gates, gates)
    assert runtime.sparsity == 0.5

    by_name = tmp_path / "by_name"
    saved_pattern(by_name / "x", random_gates(10), hf_config=None, model_name="other-org/NoSuchModel-XQ7")
    monkeypatch.setenv("DUO_VLLM_PATTERNS", str(by_name))
    runtime = build(DuoConfig(sparsity=0.5), cfg, model_name=FAKE_NAME)
    np.testing.assert_array_equal(runtime.pattern.gates, random_gates(10))


@pytest.mark.parametrize("shape", [(LAYERS, 2), (LAYERS - 1, KV_HEADS), (LAYERS, 9)])
def test_wrong_shape(tmp_path, hf_config, shape):
    path = saved_pattern(tmp_path / "pat", random_gates(11, shape), hf_config=None)
    with pytest.raises(PatternError, match="shape"):
        build(DuoConfig(pattern=path, sparsity=0.5), hf_config)


def test_fingerprint_mismatch(tmp_path, hf_config):
    other = dict(SMOLLM2_CONFIG, vocab_size=32000)
    path = saved_pattern(tmp_path / "pat", random_gates(12), hf_config=other)
    with pytest.raises(PatternError, match="fingerprint"):
        build(DuoConfig(pattern=path, sparsity=0.5), hf_config)


def test_context_extended_by_overrides_keeps_the_checkpoint_pattern(tmp_path, monkeypatch):
    """--hf-overrides that lengthen max_position_embeddings (RoPE scaling) change the served
    config's fingerprint but not the weights: the pattern of the checkpoint's config applies,
    given explicitly or found among the shipped ones; another model's pattern is still refused."""
    checkpoint = dict(SMOLLM2_CONFIG)
    served = dict(SMOLLM2_CONFIG, max_position_embeddings=131072)
    path = saved_pattern(tmp_path / "pat" / "SmolLM2-135M-Instruct", random_gates(14), hf_config=checkpoint)
    with pytest.raises(PatternError, match="fingerprint"):
        build(DuoConfig(pattern=path, sparsity=0.5), served)
    runtime = build(DuoConfig(pattern=path, sparsity=0.5), served, checkpoint_config=checkpoint)
    np.testing.assert_array_equal(runtime.pattern.gates, random_gates(14))
    monkeypatch.setenv("DUO_VLLM_PATTERNS", str(tmp_path / "pat"))
    found = build(DuoConfig(sparsity=0.5), served, model_name="some/fine-tune", checkpoint_config=checkpoint)
    np.testing.assert_array_equal(found.pattern.gates, random_gates(14))
    other = dict(SMOLLM2_CONFIG, vocab_size=32000)
    with pytest.raises(PatternError, match="fingerprint"):
        build(DuoConfig(pattern=path, sparsity=0.5), dict(other, max_position_embeddings=131072),
              checkpoint_config=other)


def test_missing_pattern_path(tmp_path, hf_config):
    with pytest.raises(PatternError, match="does not exist"):
        build(DuoConfig(pattern=str(tmp_path / "nope"), sparsity=0.5), hf_config)


def test_tp_size_that_does_not_divide_kv_heads(tmp_path, hf_config):
    path = saved_pattern(tmp_path / "pat", random_gates(13), hf_config=hf_config)
    runtime = build(DuoConfig(pattern=path, sparsity=0.5), hf_config, tp_size=2, tp_rank=0)
    with pytest.raises(PatternError, match="tensor_parallel_size"):
        runtime.local_retrieval_kv_heads(0)


# ----------------------------------------------------------------------------- head plans


@pytest.fixture
def row12_runtime(tmp_path):
    """A runtime whose layer 12 is [retrieval, streaming, retrieval]."""
    gates = random_gates(14)
    gates[12] = [0.9, 0.1, 0.8]
    path = saved_pattern(tmp_path / "pat", gates, hf_config=SMOLLM2_CONFIG)
    return lambda **kw: build(DuoConfig(pattern=path, threshold=0.5), SMOLLM2_CONFIG, **kw)


def test_plan_for_layer(row12_runtime):
    runtime = row12_runtime()
    plan = plan_for_layer(runtime, "model.layers.12.self_attn.attn", Q_HEADS, KV_HEADS)
    assert plan.layer_index == 12
    assert plan.retrieval_kv.tolist() == [True, False, True]
    assert plan.streaming_kv_heads.tolist() == [1]
    assert plan.streaming_q_heads.tolist() == [3, 4, 5]
    assert plan.streaming_q_heads.dtype == torch.long and plan.streaming_kv_heads.dtype == torch.long
    assert plan.any_retrieval and plan.any_streaming


def test_plan_for_layer_tensor_parallel(row12_runtime):
    expected = {0: [], 1: [0, 1, 2], 2: []}
    for rank, q_heads in expected.items():
        plan = plan_for_layer(row12_runtime(tp_size=3, tp_rank=rank), "model.layers.12.self_attn.attn", 3, 1)
        assert plan.streaming_q_heads.tolist() == q_heads, f"rank {rank}"
        assert plan.any_streaming == bool(q_heads) and plan.any_retrieval == (not q_heads), f"rank {rank}"


def test_plan_streaming_q_heads_follow_gqa(row12_runtime):
    runtime = row12_runtime()
    group = Q_HEADS // KV_HEADS
    for layer in range(LAYERS):
        plan = plan_for_layer(runtime, f"model.layers.{layer}.self_attn.attn", Q_HEADS, KV_HEADS)
        row = runtime.retrieval_mask[layer]
        want = [h for h in range(Q_HEADS) if not row[h // group]]
        assert plan.streaming_q_heads.tolist() == want, f"layer {layer}: mask {row.tolist()}"


def test_plan_rejects_wrong_head_count(row12_runtime):
    with pytest.raises(PatternError, match="KV heads"):
        plan_for_layer(row12_runtime(), "model.layers.12.self_attn.attn", 8, 2)


@pytest.mark.parametrize(
    "name,index",
    [("model.layers.12.self_attn.attn", 12), ("model.layers.0.self_attn.attn", 0),
     ("language_model.model.layers.29.self_attn.attn", 29)],
)
def test_layer_index_from_name(name, index):
    assert layer_index_from_name(name) == index


@pytest.mark.parametrize("name", ["model.layers.3.experts.7.attn", "model.self_attn.attn", "layers.1.2"])
def test_layer_index_from_name_rejects_ambiguous(name):
    with pytest.raises(PatternError, match="decoder layer"):
        layer_index_from_name(name)


def runtime_built_with_log(config, monkeypatch):
    """The runtime of ``config`` built afresh, and the log records of building it."""
    import logging

    import duo_vllm.runtime as runtime_module

    # Building the engine config reconfigures vLLM's loggers (dropping handlers of their
    # children) and already builds the runtime: listen from here on, with an empty cache.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    runtime_module.logger.addHandler(handler)
    monkeypatch.setattr(runtime_module, "_RUNTIMES", {})
    try:
        runtime = runtime_module.runtime_from_vllm_config(config)
    finally:
        runtime_module.logger.removeHandler(handler)
    assert any("DUO attention" in r.getMessage() for r in records)  # the runtime was built here
    return runtime, [r.getMessage() for r in records]


def test_overlap_streaming_on_cpu_is_reported_not_ignored(smollm2, monkeypatch):
    """The option only changes CUDA; asking for it elsewhere logs that it does nothing."""
    from vllm.engine.arg_utils import EngineArgs

    for overlap in (False, True):
        config = EngineArgs(model=smollm2, max_model_len=1024, attention_backend="DUO", additional_config={
            "duo": {"sparsity": 0.5, "overlap_streaming": overlap}}).create_engine_config()
        runtime, messages = runtime_built_with_log(config, monkeypatch)
        assert runtime.config.overlap_streaming is overlap
        warned = [m for m in messages if "overlap_streaming" in m]
        assert len(warned) == int(overlap), warned
    assert "no effect on cpu" in warned[0]


def test_a_cuda_kernel_choice_on_cpu_is_reported_not_ignored(smollm2, monkeypatch):
    """The option picks vLLM's CUDA backend under the retrieval heads; on CPU it changes nothing."""
    from vllm.engine.arg_utils import EngineArgs

    for kernel, warns in (("auto", False), ("flashinfer", True), ("flash_attn", True)):
        config = EngineArgs(model=smollm2, max_model_len=1024, attention_backend="DUO", additional_config={
            "duo": {"sparsity": 0.5, "kernel": kernel}}).create_engine_config()
        runtime, messages = runtime_built_with_log(config, monkeypatch)
        assert runtime.config.kernel == kernel
        warned = [m for m in messages if "kernel=" in m]
        assert len(warned) == int(warns), warned
        if warns:
            assert f"kernel={kernel} has no effect on cpu" in warned[0]


# ----------------------------------------------------------------------------- PruLong masks.tsv


def write_masks(folder, mask) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "masks.tsv"
    path.write_text("\n".join("\t".join("1.0" if v else "0.0" for v in row) for row in mask) + "\n")
    return str(path)


def mask_with_streaming(count, seed=0):
    mask = np.ones((LAYERS, KV_HEADS), dtype=bool)
    mask.reshape(-1)[np.random.default_rng(seed).choice(LAYERS * KV_HEADS, count, replace=False)] = False
    return mask


def test_masks_tsv_serves_the_mask_at_its_own_split(tmp_path, hf_config):
    mask = mask_with_streaming(60)
    path = write_masks(tmp_path / "prulong", mask)
    for pattern_option in (path, str(tmp_path / "prulong")):
        runtime = build(DuoConfig(pattern=pattern_option), hf_config)
        np.testing.assert_array_equal(runtime.retrieval_mask, mask)
        assert runtime.sparsity == pytest.approx(60 / 90)
    text = runtime.summary(4096)
    assert f"prulong-masks-tsv, sha256 {runtime.pattern.content_hash}, from the pattern option" in text, text
    assert "sparsity 0.67 (the mask's own split)" in text, text
    assert ("sink 64, recent 256 (the defaults; masks.tsv records no sink/recent: set the sink/recent "
            "options to the window it was trained with)") in text, text


def test_masks_tsv_window_comes_from_the_options_and_says_so(tmp_path, hf_config):
    path = write_masks(tmp_path, mask_with_streaming(30))
    both = DuoConfig.from_additional_config({"duo": {"pattern": path, "sink": 128, "recent": 1024}})
    text = build(both, hf_config).summary(8192)
    assert "sink 128, recent 1024 (from the options)" in text and "records no" not in text, text
    # an option equal to its default is still the user's choice
    same = DuoConfig.from_additional_config({"duo": {"pattern": path, "sink": 64, "recent": 256}})
    assert "sink 64, recent 256 (from the options)" in build(same, hf_config).summary(8192)
    one = DuoConfig.from_additional_config({"duo": {"pattern": path, "sink": 128}})
    text = build(one, hf_config).summary(8192)
    assert "sink 128, recent 256 (sink from the options, recent the default; masks.tsv records no" in text, text
    # a config built in Python: a value other than the default counts as given
    assert "recent 1024 (recent from the options, sink the default" in build(
        DuoConfig(pattern=path, recent=1024), hf_config).summary(8192)


@pytest.mark.parametrize("option", [{"sparsity": 0.5}, {"retrieval_ratio": 0.25}, {"sparsity": 0.33}])
def test_masks_tsv_refuses_a_sparsity_it_cannot_rank(tmp_path, hf_config, option):
    path = write_masks(tmp_path, mask_with_streaming(60))
    with pytest.raises(PatternError) as info:
        build(DuoConfig(pattern=path, **option), hf_config)
    message = str(info.value)
    assert "hard 0/1 head mask (60 of 90 KV heads stream" in message, message
    assert "Leave out the sparsity/retrieval_ratio option" in message and path in message, message


def test_masks_tsv_accepts_what_needs_no_ranking(tmp_path, hf_config):
    mask = mask_with_streaming(60)
    path = write_masks(tmp_path, mask)
    for option, want in (({"sparsity": 60 / 90}, mask), ({"retrieval_ratio": 1 / 3}, mask),
                         ({"sparsity": 0.0}, np.ones_like(mask)), ({"sparsity": 1.0}, np.zeros_like(mask)),
                         ({"threshold": 0.5}, mask), ({"threshold": 1.0}, mask)):
        runtime = build(DuoConfig(pattern=path, **option), hf_config)
        np.testing.assert_array_equal(runtime.retrieval_mask, want, err_msg=str(option))


def test_masks_tsv_of_the_wrong_shape_names_both_shapes(tmp_path, hf_config):
    path = write_masks(tmp_path, np.ones((LAYERS, 9), dtype=bool))  # query heads, not KV heads
    with pytest.raises(PatternError) as info:
        build(DuoConfig(pattern=path), hf_config)
    message = str(info.value)
    assert f"shape {LAYERS} layers x 9 KV heads" in message, message
    assert f"has {LAYERS} layers x {KV_HEADS} KV heads" in message and path in message, message


# ----------------------------------------------------------------------------- model folder


def model_folder(tmp_path, config=None):
    folder = tmp_path / "MyModel"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or fake_config()))
    return folder


def shipped_for_fake_model(tmp_path, monkeypatch, seed=20):
    """A shipped pattern that matches the fake model by fingerprint."""
    shipped = tmp_path / "shipped"
    saved_pattern(shipped / "NoSuchModel-xq7", random_gates(seed), hf_config=fake_config(), sparsity=0.5,
                  model_name=FAKE_NAME)
    monkeypatch.setenv("DUO_VLLM_PATTERNS", str(shipped))


def runtime_log(monkeypatch):
    import logging

    import duo_vllm.runtime as runtime_module

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger, level = runtime_module.logger, runtime_module.logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def stop():
        logger.removeHandler(handler)
        logger.setLevel(level)

    return records, stop


@pytest.mark.parametrize("fmt", ["duo_pattern.json", "masks.tsv"])
def test_pattern_in_the_model_folder_beats_the_shipped_one(tmp_path, monkeypatch, fmt):
    shipped_for_fake_model(tmp_path, monkeypatch)
    folder = model_folder(tmp_path)
    if fmt == "masks.tsv":
        mask = mask_with_streaming(45, seed=3)
        write_masks(folder, mask)
    else:
        gates = random_gates(21)
        saved_pattern(folder, gates, hf_config=fake_config(), sparsity=0.5, model_name=FAKE_NAME)
        mask = None
    records, stop = runtime_log(monkeypatch)
    try:
        runtime = build(DuoConfig(), fake_config(), model_name=str(folder))
    finally:
        stop()
    assert runtime.pattern.source == str(folder / fmt)
    assert runtime.pattern_origin == "the model folder"
    if mask is not None:
        np.testing.assert_array_equal(runtime.retrieval_mask, mask)
    else:
        np.testing.assert_array_equal(runtime.pattern.gates, random_gates(21))
    assert f"DUO pattern found in the model folder: {folder / fmt} (no pattern option given)" in records, records
    assert "from the model folder" in runtime.summary(1024)


def test_model_folder_precedence(tmp_path, monkeypatch):
    """The pattern option beats the model folder; a folder with no map (or a hub id) falls back
    to the shipped pattern; a broken map in the folder stops start-up instead of being skipped."""
    shipped_for_fake_model(tmp_path, monkeypatch)
    folder = model_folder(tmp_path)
    assert build(DuoConfig(), fake_config(), model_name=str(folder)).pattern_origin == "the shipped patterns"
    assert build(DuoConfig(), fake_config(), model_name=FAKE_NAME).pattern_origin == "the shipped patterns"
    write_masks(folder, mask_with_streaming(10))
    explicit = saved_pattern(tmp_path / "explicit", random_gates(22), hf_config=None, sparsity=0.5)
    runtime = build(DuoConfig(pattern=explicit), fake_config(), model_name=str(folder))
    assert runtime.pattern_origin == "the pattern option"
    np.testing.assert_array_equal(runtime.pattern.gates, random_gates(22))
    (folder / "masks.tsv").write_text("1\t0.5\t1\n")
    with pytest.raises(PatternError, match=r"masks.tsv, line 1, column 2: '0.5' is not 0 or 1"):
        build(DuoConfig(), fake_config(), model_name=str(folder))


def test_no_pattern_message_names_the_model_folder(tmp_path, monkeypatch):
    empty = tmp_path / "empty_patterns"
    empty.mkdir()
    monkeypatch.setenv("DUO_VLLM_PATTERNS", str(empty))
    with pytest.raises(PatternError, match="in the model's own folder"):
        build(DuoConfig(), fake_config(), model_name=str(model_folder(tmp_path)))


@pytest.mark.slow
def test_engine_serves_the_masks_in_the_model_folder_with_no_option(smollm2, tmp_path, monkeypatch):
    """One real engine: a PruLong-style checkpoint folder (weights + masks.tsv, no DUO option
    naming a pattern) serves the mask, not the shipped SmolLM2 pattern, with the window given."""
    from pathlib import Path

    import duo_vllm.runtime as runtime_module
    from tests.helpers.llm import greedy_tokens, offline_llm

    folder = tmp_path / "SmolLM2-prulong"
    folder.mkdir()
    for item in Path(smollm2).iterdir():
        (folder / item.name).symlink_to(item)
    mask = mask_with_streaming(45, seed=5)
    write_masks(folder, mask)
    monkeypatch.setattr(runtime_module, "_RUNTIMES", {})
    with offline_llm(str(folder), max_model_len=512, enforce_eager=True, attention_backend="DUO",
                     additional_config={"duo": {"sink": 16, "recent": 64}}) as llm:
        [tokens] = greedy_tokens(llm, ["The capital of France is"], max_tokens=4)
    assert len(tokens) == 4
    runtimes = list(runtime_module._RUNTIMES.values())  # built in this process from the engine config
    assert runtimes, "no DUO runtime was built"
    for runtime in runtimes:
        assert runtime.pattern_origin == "the model folder"
        assert runtime.pattern.source == str(folder / "masks.tsv")
        np.testing.assert_array_equal(runtime.retrieval_mask, mask)
        assert "sink 16, recent 64 (from the options)" in runtime.summary(512)


def test_every_process_checks_it_resolved_the_front_ends_plan(smollm2, tmp_path, monkeypatch):
    """Each engine, worker or Ray process resolves the pattern from its own files; the front-end
    records the plan it resolved in the config they all receive, and a process (another host)
    that finds another pattern refuses to start rather than serve its layers from it."""
    from vllm.engine.arg_utils import EngineArgs

    import duo_vllm.runtime as runtime_module

    config = EngineArgs(model=smollm2, max_model_len=1024, attention_backend="DUO",
                        additional_config={"duo": {"sparsity": 0.5}}).create_engine_config()
    recorded = config.additional_config[runtime_module.PLAN_DIGEST_KEY]
    assert recorded["model"] == smollm2
    monkeypatch.setattr(runtime_module, "_RUNTIMES", {})
    assert runtime_module.runtime_from_vllm_config(config).plan_digest == recorded["digest"]  # same files: starts

    # "Another host": the same options, but this process finds a different pattern first.
    other = tmp_path / "model"
    other.mkdir()
    for item in Path(smollm2).iterdir():
        (other / item.name).symlink_to(item)
    shipped = runtime_module.runtime_from_vllm_config(config)
    flipped = HeadPattern(gates=1.0 - shipped.pattern.gates, model_name=shipped.pattern.model_name,
                          model_fingerprint=shipped.pattern.model_fingerprint)
    save_pattern(flipped, other)
    config.model_config.model = str(other)
    monkeypatch.setattr(runtime_module, "_RUNTIMES", {})
    # Another model (as a speculative draft's config, which copies the target's): not compared.
    assert runtime_module.runtime_from_vllm_config(config).plan_digest != recorded["digest"]
    # The same model name, resolved to other heads on "another host": refused.
    config.additional_config = {**config.additional_config,
                                runtime_module.PLAN_DIGEST_KEY: {**recorded, "model": str(other)}}
    monkeypatch.setattr(runtime_module, "_RUNTIMES", {})
    with pytest.raises(DuoConfigError, match="every node must find the same pattern") as info:
        runtime_module.runtime_from_vllm_config(config)
    assert recorded["digest"] in str(info.value) and "\n" not in str(info.value)
