"""Write trained gates as a duo-vllm pattern file, with the record of how they were made.

The plugin and the trainer share the pattern format (``duo_vllm.pattern_io``), the model
fingerprint (``duo_vllm.fingerprint``) and the haystack text (``duo_vllm.testing.haystack``): the
pattern carries the gates, the sink/recent sizes they were trained with, the model's name and
config fingerprint (so the plugin refuses it for another model) and a provenance record (data,
schedule, seed, losses, wall time, device) so that a shipped file explains itself.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np

from duo_vllm.fingerprint import model_fingerprint
from duo_vllm.pattern import HeadPattern, binarize, retrieval_stats
from duo_vllm.pattern_io import save_pattern

logger = logging.getLogger(__name__)

__all__ = ["cut_stats", "export_pattern", "gate_stats", "training_provenance", "unsettled_warning"]


def gate_stats(gates: np.ndarray, sparsity: float | None = None) -> dict[str, Any]:
    """Summary of a gate array ``[num_layers, num_kv_heads]`` for logs, README and provenance."""
    g = np.asarray(gates, dtype=np.float64)
    stats: dict[str, Any] = {
        "mean": round(float(g.mean()), 6),
        "min": round(float(g.min()), 6),
        "max": round(float(g.max()), 6),
        "num_heads": int(g.size),
        "below_0.1": int((g < 0.1).sum()),
        "below_0.5": int((g < 0.5).sum()),
        "above_0.9": int((g > 0.9).sum()),
        "layer_means": [round(float(x), 4) for x in g.mean(axis=1)],
    }
    if sparsity is not None:
        mask = binarize(g.astype(np.float32), sparsity=sparsity)
        rs = retrieval_stats(mask)
        stats["retrieval_per_layer_at_sparsity"] = {"sparsity": sparsity, "per_layer": rs["per_layer"]}
        stats["cut_at_sparsity"] = cut_stats(g, int(mask.sum()))
    return stats


UNSETTLED_BAND = 0.01  # gates this close to the deployment cut are counted as not yet decided


def cut_stats(gates: np.ndarray, num_retrieval: int) -> dict[str, Any] | None:
    """How clearly the gates separate at the deployment cut (the ``num_retrieval``-th highest gate):
    the gap between the last retrieval and the first streaming gate, and how many heads lie
    within ``UNSETTLED_BAND`` of the cut. Gates still bunched near the cut (typically all near 1
    after a short run) rank those heads by optimiser noise: another seed picks others."""
    order = np.sort(np.asarray(gates, dtype=np.float64).ravel())[::-1]
    if not 0 < num_retrieval < order.size:
        return None
    cut = (order[num_retrieval - 1] + order[num_retrieval]) / 2
    return {"gap": round(float(order[num_retrieval - 1] - order[num_retrieval]), 6),
            "heads_within_band": int((np.abs(order - cut) <= UNSETTLED_BAND).sum()),
            "band": UNSETTLED_BAND}


# Mean square of SmolLM2-135M-Instruct's final hidden states at the answer positions, where the
# paper's reg weight 0.05 separates the gates (Qwen2.5-0.5B: ~43, separated at 0.5; the pattern
# READMEs and patterns/Qwen2.5-Coder-0.5B-Instruct/validation/reg_weight_cpu_study.json).
REFERENCE_HIDDEN_MEAN_SQUARE = 3.8


def unsettled_warning(stats: dict[str, Any], *, reg_weight: float | None = None,
                      hidden_mean_square: float | None = None) -> str | None:
    """A warning when at least a tenth of the heads (and at least 3) sit within the band of the cut;
    with this run's reg weight and the model's hidden-state mean square it suggests a weight."""
    cut = stats.get("cut_at_sparsity")
    if not cut:
        return None
    if cut["heads_within_band"] < max(3, 0.1 * stats["num_heads"]):
        return None
    sparsity = stats["retrieval_per_layer_at_sparsity"]["sparsity"]
    advice = ("the distillation term grows with the size of the model's final hidden states, so models "
              "with large hidden states need a larger --reg-weight than the paper's 0.05")
    if reg_weight is not None and hidden_mean_square:
        scaled = 0.05 * hidden_mean_square / REFERENCE_HIDDEN_MEAN_SQUARE
        advice = (f"this model's final hidden states have mean square {hidden_mean_square:.1f} at the answer "
                  f"positions against {REFERENCE_HIDDEN_MEAN_SQUARE} for SmolLM2-135M, where 0.05 separates the "
                  f"gates: --reg-weight {scaled:.2g} matches that")
        if reg_weight >= scaled:
            advice = (f"this run's --reg-weight {reg_weight:g} is already at least the hidden-state-scaled "
                      f"{scaled:.2g}, so train longer")
    return (f"{cut['heads_within_band']} of {stats['num_heads']} gates lie within {cut['band']} of the "
            f"sparsity-{sparsity} cut (gates mean {stats['mean']:.3f}, {stats['below_0.5']} below 0.5): which of "
            "those heads stream is not settled by this run, and another seed would pick others. Train "
            f"longer (--steps) or raise --reg-weight so the gates separate; {advice}")


def export_pattern(
    out_dir: str | Path,
    gates: np.ndarray,
    *,
    hf_config: Any,
    model_name: str,
    sink: int,
    recent: int,
    sparsity: float,
    provenance: dict[str, Any],
    overwrite: bool = True,
) -> Path:
    """Save ``gates`` (clipped to [0, 1]) as ``<out_dir>/duo_pattern.json``; returns the file path.

    Parameters
    ----------
    hf_config : the model's ``PretrainedConfig`` as read from its config.json (for the fingerprint)
    provenance : JSON-serialisable record of the run
    """
    gates = np.clip(np.asarray(gates, dtype=np.float32), 0.0, 1.0)
    pattern = HeadPattern(
        gates=gates,
        sink_size=int(sink),
        recent_size=int(recent),
        model_name=model_name,
        model_fingerprint=model_fingerprint(hf_config),
        sparsity=float(sparsity),
        provenance=dict(provenance),
    )
    path = save_pattern(pattern, out_dir, overwrite=overwrite)
    logger.info("Wrote %s (%s)", path, pattern.describe())
    return path


def training_provenance(trainer, evaluation: dict[str, Any] | None, gates: np.ndarray) -> dict[str, Any]:
    """The record a pattern keeps of its run (model, data, schedule, losses, wall time, device,
    versions), read from a :class:`gate_training.trainer.GateTrainer`."""
    from gate_training import distributed, preflight
    from gate_training.data import describe_haystack

    cfg, dist = trainer.cfg, trainer.dist
    tail = trainer.history[-10:]
    return {
        "trainer": "gate_training (duo-vllm)",
        "model_path": str(Path(cfg.model).expanduser().resolve()),
        "model": preflight.describe_model(trainer.hf_config),
        "data": {
            "task": "multi-passkey retrieval in "
                    + ("Canterbury-corpus prose" if cfg.haystack is None else "the user's haystack text"),
            "haystack": describe_haystack(cfg.haystack, trainer.tokenizer),
            "num_passkeys": cfg.num_passkeys,
            "passkey_length_words": cfg.passkey_length,
            "min_context": cfg.min_context,
            "max_context": trainer.max_context,
            "num_lengths": cfg.num_lengths,
            "samples": cfg.steps * trainer.batch_size,
        },
        "training": {
            "steps": trainer.step,
            "warmup": cfg.warmup,
            "lr": cfg.lr,
            "lr_min": cfg.lr_min,
            "weight_decay": cfg.weight_decay,
            "reg_weight": cfg.reg_weight,
            "seed": cfg.seed,
            "dtype": str(trainer.dtype).replace("torch.", ""),
            "gates_dtype": "float32",
            "streaming_impl": trainer.streaming_impl,
            "batch_size": trainer.batch_size,
            **({"distributed": distributed.describe(dist)} if dist.enabled else {}),
        },
        "final_losses": {
            "last10_mean_loss": _mean(r["loss"] for r in tail),
            "last10_mean_distill": _mean(r["distill"] for r in tail),
            "last10_mean_reg": _mean(r["reg"] for r in tail),
        },
        "heldout_eval": evaluation,
        "gate_stats": gate_stats(gates, cfg.sparsity),
        "wall_time_s": round(trainer.elapsed, 1),
        "seconds_per_step": round(trainer.elapsed / max(trainer.step, 1), 3),
        "device": device_name(trainer.device) + (f" x {dist.world_size} processes" if dist.enabled else ""),
        "versions": versions(),
    }


def _mean(values) -> float | None:
    values = list(values)
    return round(float(np.mean(values)), 6) if values else None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import datasets

        out["datasets"] = datasets.__version__
    except ImportError:
        pass
    return out
