"""Checks that must fail before any training step, each with one message saying what to do.

A gate-training run can take hours; every input problem we can detect cheaply (output folder,
haystack text, architecture, context length, the attention routing itself) is checked here first,
in order of cost: paths, then the model's config.json, then the loaded model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gate_training.config import GateTrainingError, TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "check_output_dir",
    "read_model_config",
    "resolve_context",
    "resolve_device",
    "resolve_dtype",
    "load_frozen_model",
    "probe_gated_routing",
    "CONTEXT_CAP",
]

CONTEXT_CAP = 32768  # default max_context cap when the model allows more


def qa_room(cfg: TrainConfig) -> int:
    """Generous token estimate of question + answer, kept free when max_context is defaulted."""
    return 32 + cfg.num_passkeys * (2 * cfg.passkey_length + 12)


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to clobber an existing output folder unless asked to."""
    out = cfg.out_path
    if out.exists() and not out.is_dir():
        raise GateTrainingError(f"output path {out} exists and is not a folder; choose another --out")
    if cfg.resume:
        return
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise GateTrainingError(
            f"output folder {out} already exists; pass --overwrite to replace it, --resume to "
            "continue its run, or choose another --out"
        )


def read_model_config(model_path: str):
    """The model's ``PretrainedConfig``; refuses non-decoder and non-causal-LM architectures."""
    from transformers import AutoConfig

    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise GateTrainingError(
            f"no config.json in {path}: --model must be a local Hugging Face model folder "
            "(config.json + safetensors weights)"
        )
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise GateTrainingError(
            f"transformers cannot read {path / 'config.json'} ({str(exc).splitlines()[0]}); "
            "upgrade transformers or check the file"
        ) from None
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        raise GateTrainingError(
            f"{path.name} is an encoder-decoder model ({', '.join(archs) or config.model_type}); "
            "gate training supports decoder-only causal LMs (Llama, Qwen2, Mistral, ...)"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def causal_head(name: str) -> bool:
        return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")

    if archs:
        causal = any(causal_head(a) for a in archs)
    else:
        causal = causal_head(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""))
    if not causal or getattr(config, "is_causal", True) is False:
        raise GateTrainingError(
            f"{path.name} ({', '.join(archs) or config.model_type}) is not a decoder-only causal LM; "
            "gate training supports models loadable with AutoModelForCausalLM (Llama, Qwen2, "
            "Mistral, ...)"
        )
    for name in ("num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        if not isinstance(getattr(config, name, None), int):
            raise GateTrainingError(
                f"{path.name} ({', '.join(archs) or config.model_type}) has no integer {name} in its "
                "config; this architecture is not supported"
            )
    return config


def sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2 declares but disables it
        return None
    return window


def resolve_context(cfg: TrainConfig, config) -> int:
    """The effective ``max_context``; refuses contexts the model cannot position."""
    max_pos = config.max_position_embeddings
    window = sliding_window(config)
    limit = min(max_pos, window) if window else max_pos
    if cfg.max_context is None:
        max_context = min(limit - qa_room(cfg), CONTEXT_CAP)
        if max_context < cfg.min_context:
            raise GateTrainingError(
                f"the model's maximum context ({limit} tokens) leaves no room above "
                f"--min-context {cfg.min_context}; lower --min-context"
            )
        return max_context
    if cfg.max_context > max_pos:
        raise GateTrainingError(
            f"--max-context {cfg.max_context} is longer than the model's max_position_embeddings "
            f"({max_pos}); use --max-context <= {max_pos - qa_room(cfg)} (room is needed for the "
            "question and answer too)"
        )
    if window and cfg.max_context > window:
        raise GateTrainingError(
            f"the model uses {window}-token sliding-window attention; train with --max-context "
            f"<= {window} so that full attention is what the model was trained with"
        )
    return cfg.max_context


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GateTrainingError(f"--device {cfg.device} asked for but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(cfg: TrainConfig, config) -> torch.dtype:
    """'auto': bf16 for bf16/fp16 checkpoints (the paper trains in bf16), else fp32."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return torch.bfloat16 if stored in (torch.bfloat16, torch.float16) else torch.float32


def load_frozen_model(cfg: TrainConfig, config, device: torch.device, dtype: torch.dtype):
    """The model in eval mode with every weight frozen (only the gates will train)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    except (ValueError, OSError, KeyError) as exc:
        raise GateTrainingError(
            f"cannot load {cfg.model} as a causal LM ({str(exc).splitlines()[0]}); gate training "
            "supports decoder-only models loadable with AutoModelForCausalLM"
        ) from None
    model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.gradient_checkpointing:
        # HF layers checkpoint only in training mode; keep dropout off so student == teacher at alpha=1.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.eval()
    return model


def probe_gated_routing(model, state, device: torch.device, forward=None) -> None:
    """Run 8 tokens and check every layer called the gated attention exactly once.

    ``forward(input_ids)`` runs the model (default: its ``base_model``; a sharded model must be
    called through its FSDP root).
    """
    num_layers = model.config.num_hidden_layers
    before = state.calls
    ids = torch.arange(3, 11, device=device).view(1, -1)
    if forward is None:
        def forward(input_ids):
            return model.base_model(input_ids=input_ids, use_cache=False)
    try:
        with torch.no_grad():
            forward(ids)
    except Exception as exc:  # noqa: BLE001 - any failure here means "unsupported architecture"
        raise GateTrainingError(
            f"{type(model).__name__} fails with the gated attention ({type(exc).__name__}: {exc}); "
            "this architecture is not supported"
        ) from None
    calls = state.calls - before
    if calls != num_layers:
        raise GateTrainingError(
            f"{type(model).__name__} routed {calls} of {num_layers} layers through transformers' "
            "attention interface; its attention is not pluggable, so this architecture is not "
            "supported"
        )


def describe_model(config) -> dict[str, Any]:
    return {
        "architectures": list(getattr(config, "architectures", None) or []),
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
    }
