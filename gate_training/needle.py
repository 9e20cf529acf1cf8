"""Needle check of a pattern: does it keep the model's long-context retrieval?

Runs the model through the plain-torch DuoAttention reference (:mod:`duo_vllm.reference`, not the
training code) on held-out multi-passkey samples at one context length, for four head sets:
full attention, the pattern at ``sparsity``, the inverted pattern (the same number of retrieval
heads taken from the LOWEST gates) and every head streaming. A pattern that matters keeps the
needle score of full attention while the inverted one and all-streaming lose it.

``python -m gate_training.needle --model PATH --pattern patterns/NAME [--context N] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gate_training.config import GateTrainingError

logger = logging.getLogger("gate_training.needle")

HEAD_SETS = ("full", "pattern", "inverse", "all_streaming")
_NEEDLE_INDEX = 2_000_029  # sample indices of this check: disjoint from training and trainer eval


def head_sets(gates: np.ndarray, sparsity: float) -> dict[str, np.ndarray]:
    """Retrieval masks [layers, kv_heads] of the four compared head sets."""
    from duo_vllm.pattern import binarize

    return {
        "full": np.ones(gates.shape, dtype=bool),
        "pattern": binarize(gates, sparsity=sparsity),
        "inverse": binarize(-gates, sparsity=sparsity),  # highest of -g = lowest gates
        "all_streaming": np.zeros(gates.shape, dtype=bool),
    }


def _answer_scores(model, sample: dict[str, Any], device) -> dict[str, float]:
    """Teacher-forced needle score: the share of passkey answer tokens the model predicts."""
    import torch

    ids = torch.as_tensor(sample["input_ids"], device=device).unsqueeze(0)
    start = int(sample["answer_start"])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, start - 1 : -1]
        predicted = model.get_output_embeddings()(hidden).argmax(-1).cpu().numpy()
    target = np.asarray(sample["input_ids"][start:])
    return {"token_accuracy": float((predicted == target).mean())}


def needle_check(
    model_path: str | Path,
    pattern_path: str | Path,
    *,
    context: int | None = None,
    samples: int = 4,
    sparsity: float | None = None,
    sink: int | None = None,
    recent: int | None = None,
    num_passkeys: int = 5,
    passkey_length: int = 16,
    seed: int = 0,
    haystack: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Needle scores of the four head sets (means over ``samples`` held-out samples)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from duo_vllm.fingerprint import model_fingerprint
    from duo_vllm.pattern import PatternError, validate_for_model
    from duo_vllm.pattern_io import load_pattern
    from duo_vllm.reference import use_duo_reference
    from gate_training.data import PasskeySpec, make_sample

    model_path = Path(model_path)
    if samples < 1 or num_passkeys < 1 or passkey_length < 1:
        raise GateTrainingError("--samples, --num-passkeys and --passkey-length must be at least 1")
    if not (model_path / "config.json").is_file():
        raise GateTrainingError(f"{model_path} has no config.json: pass a local Hugging Face model folder")
    try:
        pattern = load_pattern(pattern_path)
        config = AutoConfig.from_pretrained(model_path)
        validate_for_model(
            pattern,
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            fingerprint=model_fingerprint(config),
            model_name=model_path.name,
        )
    except (PatternError, FileNotFoundError) as exc:
        raise GateTrainingError(str(exc)) from None
    sparsity = pattern.sparsity if sparsity is None else sparsity
    if sparsity is None or not 0.0 <= sparsity <= 1.0:
        raise GateTrainingError("pass --sparsity in [0, 1] (the pattern has no default)")
    sink = pattern.sink_size if sink is None else sink
    recent = pattern.recent_size if recent is None else recent
    if sink is None or recent is None:
        raise GateTrainingError("the pattern does not record sink/recent sizes: pass --sink and --recent")
    max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
    answer_room = num_passkeys * (passkey_length * 4 + 16) + 64  # question + answer tokens, generous
    if context is None:
        if not max_positions:
            raise GateTrainingError("the model config has no max_position_embeddings: pass --context")
        context = max_positions - answer_room
    if context <= sink + recent:
        raise GateTrainingError(f"--context {context} must exceed sink + recent ({sink + recent}), "
                                "or nothing is streamed")
    if max_positions and context + answer_room > max_positions:
        raise GateTrainingError(f"--context {context} plus the question and answer exceeds the model's "
                                f"{max_positions} positions; use at most {max_positions - answer_room}")

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    spec = PasskeySpec(num_samples=samples, min_context=context, max_context=context, num_lengths=1,
                       num_passkeys=num_passkeys, passkey_length=passkey_length, seed=seed,
                       haystack=None if haystack is None else str(haystack))
    data = [make_sample(tokenizer, spec, _NEEDLE_INDEX + k, context) for k in range(samples)]
    longest = max(len(sample["input_ids"]) for sample in data)
    if max_positions and longest > max_positions:
        raise GateTrainingError(f"a sample takes {longest} tokens with its question and answer, more than "
                                f"the model's {max_positions} positions: lower --context")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
    masks = head_sets(pattern.gates, sparsity)
    per_set: dict[str, list[dict[str, float]]] = {name: [] for name in HEAD_SETS}
    started = time.perf_counter()
    bar = tqdm(total=len(HEAD_SETS) * samples, desc="needle check", unit="run", disable=not progress)
    for name in HEAD_SETS:
        use_duo_reference(model, masks[name], sink=sink, recent=recent)
        for sample in data:
            per_set[name].append(_answer_scores(model, sample, device))
            bar.update(1)
    bar.close()

    def mean(name: str, key: str) -> float:
        return round(float(np.mean([s[key] for s in per_set[name]])), 4)

    return {
        "model": model_path.name,
        "pattern": str(pattern_path),
        "context": context,
        "samples": samples,
        "num_passkeys": num_passkeys,
        "passkey_length": passkey_length,
        "seed": seed,
        "haystack": "Canterbury corpus" if haystack is None else str(Path(haystack).expanduser().resolve()),
        "sparsity": sparsity,
        "sink": sink,
        "recent": recent,
        "retrieval_heads": {name: int(m.sum()) for name, m in masks.items()},
        "num_kv_heads": int(pattern.gates.size),
        "token_accuracy": {name: mean(name, "token_accuracy") for name in HEAD_SETS},
        "per_sample": per_set,
        "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu",
        "dtype": str(model.dtype).replace("torch.", ""),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of a :func:`needle_check` result."""
    lines = ["| heads | retrieval heads | answer-token accuracy |", "|---|---|---|"]
    for name in HEAD_SETS:
        lines.append(f"| {name} | {result['retrieval_heads'][name]} / {result['num_kv_heads']} | "
                     f"{result['token_accuracy'][name]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gate_training.needle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model folder")
    parser.add_argument("--pattern", required=True, help="duo_pattern.json, or the folder holding it")
    parser.add_argument("--context", type=int, help="context tokens (default: the model's maximum)")
    parser.add_argument("--samples", type=int, default=4, help="held-out samples")
    parser.add_argument("--sparsity", type=float, help="fraction of streaming heads (default: the pattern's)")
    parser.add_argument("--sink", type=int, help="sink tokens (default: the pattern's)")
    parser.add_argument("--recent", type=int, help="recent tokens (default: the pattern's)")
    parser.add_argument("--num-passkeys", type=int, default=5)
    parser.add_argument("--passkey-length", type=int, default=16, help="words per passkey")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--haystack", help="UTF-8 text file or folder of .txt files the passkeys are hidden in "
                                           "(default: the Canterbury corpus)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, parallel runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pattern = Path(args.pattern)
    if pattern.is_dir():
        pattern = pattern / "duo_pattern.json"
    try:
        result = needle_check(args.model, pattern, context=args.context, samples=args.samples,
                              sparsity=args.sparsity, sink=args.sink, recent=args.recent,
                              num_passkeys=args.num_passkeys, passkey_length=args.passkey_length,
                              seed=args.seed, haystack=args.haystack, device=args.device, dtype=args.dtype,
                              progress=not args.no_progress)
    except GateTrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['model']}, {result['context']} tokens, {result['samples']} samples, "
          f"sink {result['sink']} / recent {result['recent']}, sparsity {result['sparsity']}:")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
