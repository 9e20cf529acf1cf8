"""Training-free head scores: ``python -m gate_training score MODEL --out DIR``.

Why: gate training costs a GPU for tens of minutes to hours per model. Retrieval heads reveal
themselves without training (RazorAttention's echo/induction heads, RTPurbo's calibration): feed a
passage twice, and on the second copy such a head attends back to the first copy, to the same token
(echo) or to the one after it (induction), thousands of tokens outside any streaming window. A
local head attends to its recent window and the sink instead. One forward pass per sample, with
the attention probabilities of a few hundred second-copy queries taken in every layer, ranks the
KV heads; the scores are written in the pattern format the plugin serves, with the method in the
provenance. The full attention output is computed by transformers' own SDPA path, unchanged.

Score of a KV head = the largest, over its query heads, of the mean attention mass that a
second-copy query puts on the two tokens of the first copy it would copy from (echo + induction).
It lies in [0, 1] and is stored as the gate; ``sparsity`` then keeps the highest-scoring heads as
retrieval heads, like trained gates.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gate_training.config import DEVICES_HELP, DTYPES, GateTrainingError

logger = logging.getLogger(__name__)

SCORE_IMPLEMENTATION = "duo_head_score"
QUERY_CHUNK = 64  # second-copy queries scored at once: bounds the [Hq, chunk, T] fp32 scores


@dataclass
class ScoreConfig:
    """Options of one scoring run (every field is a ``--flag`` of the command line)."""

    model: str
    out: str
    lengths: list[int] = field(default_factory=lambda: [4096])
    samples: int = 2
    queries: int = 256
    sink: int = 64
    recent: int = 256
    sparsity: float = 0.5
    haystack: str | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    overwrite: bool = False
    compare: str | None = None

    def check(self) -> None:
        if not self.lengths or any(not isinstance(n, int) or n <= 0 for n in self.lengths):
            raise GateTrainingError(f"--lengths must be positive token counts, got {self.lengths}")
        for name in ("samples", "queries"):
            if getattr(self, name) < 1:
                raise GateTrainingError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.sink < 0 or self.recent < 1:
            raise GateTrainingError(f"--sink must be >= 0 and --recent >= 1, got {self.sink} and {self.recent}")
        if not (isinstance(self.sparsity, float | int) and 0.0 <= self.sparsity <= 1.0) or math.isnan(self.sparsity):
            raise GateTrainingError(f"--sparsity must lie in [0, 1] (share of streaming heads), got {self.sparsity}")
        shortest = min(self.lengths)
        if shortest // 2 <= self.sink + self.recent:
            raise GateTrainingError(
                f"--lengths {shortest} is too short: the passage is repeated, so its two copies are "
                f"{shortest // 2} tokens apart, which must exceed sink + recent ({self.sink + self.recent}) "
                f"for the first copy to lie outside the streaming window; use --lengths >= "
                f"{2 * (self.sink + self.recent) + 2}")
        if self.dtype not in DTYPES:
            raise GateTrainingError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        out = Path(self.out).expanduser()
        if out.exists() and not out.is_dir():
            raise GateTrainingError(f"output path {out} exists and is not a folder; choose another --out")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise GateTrainingError(f"output folder {out} already exists; pass --overwrite or choose another --out")


class _Probe:
    """Accumulates, per layer and query head, the attention mass of second-copy queries on their
    echo/induction tokens and outside the streaming window (sink + recent)."""

    def __init__(self, num_layers: int, num_q_heads: int, sink: int, recent: int):
        self.sink, self.recent = sink, recent
        self.copy_mass = np.zeros((num_layers, num_q_heads))
        self.far_mass = np.zeros((num_layers, num_q_heads))
        self.count = np.zeros(num_layers)
        self.rows = self.distance = None

    def start(self, rows, distance: int) -> None:
        """The next forward pass: score queries at ``rows``, whose first copies lie ``distance`` back."""
        self.rows, self.distance = rows, distance

    def observe(self, layer: int, query, key, scale: float) -> None:
        import torch

        q_heads, kv_heads = query.shape[1], key.shape[1]
        keys = key[0].float().repeat_interleave(q_heads // kv_heads, dim=0)  # [Hq, T, D]
        positions = torch.arange(keys.shape[1], device=keys.device)
        copy_sum = torch.zeros(q_heads, device=keys.device)
        far_sum = torch.zeros(q_heads, device=keys.device)
        for start in range(0, len(self.rows), QUERY_CHUNK):
            rows = self.rows[start:start + QUERY_CHUNK].to(keys.device)
            scores = torch.einsum("hqd,htd->hqt", query[0, :, rows].float(), keys) * scale
            future = positions[None, :] > rows[:, None]
            probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
            echo = rows - self.distance
            targets = torch.stack([echo, echo + 1], dim=-1)  # [chunk, 2]
            copy_sum += probs.gather(-1, targets.expand(q_heads, -1, -1)).sum(dim=(-1, -2))
            window = (positions[None, :] < self.sink) | (positions[None, :] > rows[:, None] - self.recent)
            far_sum += probs.masked_fill(window, 0.0).sum(dim=(-1, -2))
        self.copy_mass[layer] += copy_sum.cpu().numpy()
        self.far_mass[layer] += far_sum.cpu().numpy()
        self.count[layer] += len(self.rows)

    def kv_scores(self, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
        """Per (layer, KV head): the largest mean over its query heads, of copy and far mass."""
        if not self.count.all():
            missing = np.flatnonzero(self.count == 0).tolist()
            raise GateTrainingError(
                f"layers {missing} never called the scoring attention: this architecture routes "
                "attention around transformers' attention interface and cannot be scored")
        copy = self.copy_mass / self.count[:, None]
        far = self.far_mass / self.count[:, None]
        group = copy.shape[1] // num_kv_heads
        return (copy.reshape(len(copy), num_kv_heads, group).max(-1),
                far.reshape(len(far), num_kv_heads, group).max(-1))


def _scoring_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: SDPA's output, plus the probe's measurement."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    probe = getattr(module, "duo_probe", None)
    if probe is not None and probe.rows is not None and query.shape[2] == key.shape[2]:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        probe.observe(module.layer_idx, query, key, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _attach(model, probe: _Probe) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SCORE_IMPLEMENTATION, _scoring_attention)
    layers = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "o_proj")]
    if len(layers) != len(probe.count):
        raise GateTrainingError(
            f"found {len(layers)} attention modules for {len(probe.count)} layers: this architecture "
            "is not supported by the head scorer")
    for module in layers:
        module.duo_probe = probe
    model.set_attn_implementation(SCORE_IMPLEMENTATION)


def _passages(tokenizer, cfg: ScoreConfig, rng: np.random.Generator):
    """(length, token ids, first second-copy position, distance) for every sample."""
    from duo_vllm.testing.haystack import encoded_text, special_prefix
    from gate_training.data import load_haystack

    ids = encoded_text(tokenizer, load_haystack(cfg.haystack))
    prefix = special_prefix(tokenizer)
    for length in cfg.lengths:
        n = (length - len(prefix)) // 2
        if n > len(ids):
            raise GateTrainingError(
                f"the haystack has {len(ids)} tokens for this tokenizer; --lengths {length} needs a "
                f"passage of {n}: use shorter --lengths or a longer --haystack")
        for _ in range(cfg.samples):
            offset = int(rng.integers(0, len(ids) - n + 1))
            passage = list(ids[offset:offset + n])
            yield length, prefix + passage + passage, len(prefix) + n, n


def score_heads(cfg: ScoreConfig, *, progress: bool = True) -> dict[str, Any]:
    """Score every KV head of ``cfg.model``; returns gates, far-mass, the model config and timing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gate_training import preflight

    cfg.check()
    config = preflight.read_model_config(cfg.model)
    longest = max(cfg.lengths)
    if longest > config.max_position_embeddings:
        raise GateTrainingError(
            f"--lengths {longest} is longer than the model's max_position_embeddings "
            f"({config.max_position_embeddings}); use shorter lengths")
    window = preflight.sliding_window(config)
    if window and longest > window:
        raise GateTrainingError(
            f"the model attends within a {window}-token sliding window; use --lengths <= {window}")
    device = preflight.resolve_device(cfg)
    dtype = preflight.resolve_dtype(cfg, config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
    except (ValueError, OSError, KeyError) as exc:
        raise GateTrainingError(f"cannot load {cfg.model} as a causal LM ({str(exc).splitlines()[0]})") from None
    num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    probe = _Probe(config.num_hidden_layers, config.num_attention_heads, cfg.sink, cfg.recent)
    _attach(model, probe)
    base = getattr(model, model.base_model_prefix, model)
    rng = np.random.default_rng(cfg.seed)
    samples = list(_passages(tokenizer, cfg, rng))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), desc="scoring heads", unit="sample")
    started = time.perf_counter()
    with torch.inference_mode():
        for length, ids, first, distance in samples:
            # second-copy queries, evenly spread, each with its echo and induction token in the first copy
            rows = torch.linspace(first + 1, len(ids) - 1, steps=min(cfg.queries, len(ids) - first - 1)).long().unique()
            probe.start(rows, distance)
            # the decoder alone: the LM head's [T, vocab] logits are not needed
            base(input_ids=torch.tensor([ids], device=device), use_cache=False)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{length} tokens")
    if bar is not None:
        bar.close()
    gates, far = probe.kv_scores(num_kv)
    return {"gates": gates, "far_mass": far, "config": config, "seconds": time.perf_counter() - started,
            "device": device, "dtype": dtype, "tokenizer": tokenizer}


def score_and_export(cfg: ScoreConfig, *, progress: bool = True) -> Path:
    """Score, then write ``<out>/duo_pattern.json`` with the method in its provenance."""
    from duo_vllm.pattern import binarize
    from gate_training.data import describe_haystack
    from gate_training.export import device_name, export_pattern, gate_stats, versions
    from gate_training.preflight import describe_model

    if cfg.compare:  # a wrong path fails now, not after the scoring pass
        from duo_vllm.pattern_io import load_pattern

        load_pattern(cfg.compare)
    result = score_heads(cfg, progress=progress)
    gates = result["gates"].astype(np.float32)
    provenance = {
        "method": "training-free head scores (gate_training.score): attention mass of second-copy "
                  "queries on their echo + induction tokens in the first copy of a repeated passage",
        "scorer": "gate_training score (duo-vllm)",
        "model_path": str(Path(cfg.model).expanduser().resolve()),
        "model": describe_model(result["config"]),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("model", "out", "overwrite", "compare")},
        "haystack": describe_haystack(cfg.haystack, result["tokenizer"]),
        "far_mass": np.round(result["far_mass"], 4).tolist(),
        "gate_stats": gate_stats(gates, cfg.sparsity),
        "wall_time_s": round(result["seconds"], 1),
        "device": device_name(result["device"]),
        "dtype": str(result["dtype"]).replace("torch.", ""),
        "versions": versions(),
    }
    if cfg.compare:
        provenance["agreement"] = agreement(gates, cfg.compare, cfg.sparsity)
    path = export_pattern(cfg.out, gates, hf_config=result["config"],
                          model_name=Path(cfg.model).expanduser().resolve().name, sink=cfg.sink,
                          recent=cfg.recent, sparsity=cfg.sparsity, provenance=provenance, overwrite=True)
    mask = binarize(gates, sparsity=cfg.sparsity)
    print(f"scored {gates.size} KV heads in {result['seconds']:.1f} s on {device_name(result['device'])}; "
          f"{int(mask.sum())} retrieval heads at sparsity {cfg.sparsity}")
    if cfg.compare:
        a = provenance["agreement"]
        print(f"agreement with {cfg.compare}: {a['shared_retrieval_heads']} of {a['retrieval_heads']} retrieval "
              f"heads ({a['share']:.0%}); rank correlation {a['rank_correlation']:.2f}")
    return path


def agreement(gates: np.ndarray, other: str, sparsity: float) -> dict[str, Any]:
    """Shared retrieval heads at ``sparsity`` and Spearman rank correlation with another pattern."""
    from duo_vllm.pattern import binarize
    from duo_vllm.pattern_io import load_pattern

    theirs = load_pattern(other).gates
    if theirs.shape != gates.shape:
        raise GateTrainingError(f"--compare {other} has shape {tuple(theirs.shape)}, the scores {tuple(gates.shape)}: "
                                "compare with a pattern of the same model")
    a, b = binarize(gates, sparsity=sparsity), binarize(np.asarray(theirs, np.float32), sparsity=sparsity)
    ranks = [np.argsort(np.argsort(x.ravel(), kind="stable"), kind="stable") for x in (gates, np.asarray(theirs))]
    rho = float(np.corrcoef(*ranks)[0, 1]) if gates.size > 1 else 1.0
    shared, total = int((a & b).sum()), int(a.sum())
    return {"pattern": str(other), "sparsity": sparsity, "retrieval_heads": total,
            "shared_retrieval_heads": shared, "share": round(shared / total, 4) if total else 1.0,
            "rank_correlation": round(rho, 4)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gate_training score",
        description="Score every KV head of a model without training (a repeated passage, one forward "
                    "pass per sample) and write a duo-vllm pattern.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ScoreConfig(model="", out="")
    p.add_argument("model", help="local Hugging Face model folder (decoder-only causal LM)")
    p.add_argument("--out", required=True, help="output folder for duo_pattern.json")
    p.add_argument("--lengths", default=",".join(map(str, d.lengths)),
                   help="sample lengths in tokens, comma-separated (each is a passage and its repeat)")
    p.add_argument("--samples", type=int, default=d.samples, help="samples per length")
    p.add_argument("--queries", type=int, default=d.queries, help="second-copy queries scored per sample")
    p.add_argument("--sink", type=int, default=d.sink, help="sink tokens of a streaming head (stored in the pattern)")
    p.add_argument("--recent", type=int, default=d.recent, help="recent-window tokens of a streaming head (stored)")
    p.add_argument("--sparsity", type=float, default=d.sparsity, help="default deployment sparsity stored in the pattern")
    p.add_argument("--haystack", default=None, help="text of the passages: a UTF-8 file or a folder of .txt files "
                                                    "(default: the Canterbury corpus)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the passage offsets")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="model dtype; auto = bf16 for bf16/fp16 checkpoints")
    p.add_argument("--device", default=d.device, help=DEVICES_HELP)
    p.add_argument("--compare", default=None, help="a pattern of the same model (e.g. a trained one): report "
                                                   "shared retrieval heads and rank correlation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        lengths = [int(x) for x in args.lengths.replace(" ", "").split(",") if x]
    except ValueError:
        print(f"error: --lengths must be comma-separated integers, got {args.lengths!r}", file=sys.stderr)
        return 2
    cfg = ScoreConfig(model=args.model, out=args.out, lengths=lengths, samples=args.samples, queries=args.queries,
                      sink=args.sink, recent=args.recent, sparsity=args.sparsity, haystack=args.haystack,
                      seed=args.seed, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                      compare=args.compare)
    from duo_vllm.pattern import PatternError

    try:
        path = score_and_export(cfg, progress=not args.no_progress)
    except (GateTrainingError, PatternError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
