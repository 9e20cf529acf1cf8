"""What the GPU benchmark scripts share: the model shapes and cases, the engines' arguments, the
device floors. A library, not a script: ``kv_capacity.py``, ``duo_speed.py`` and
``profile_decode.py`` import it (none imports another script).

Nothing here imports vLLM or torch at import time, and nothing here changes process-wide state
unless called (``set_engine_environment``): the device floors are a value (``device_floors``),
passed to whatever computes a floor.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from duo_vllm.config import KERNELS as DUO_KERNELS  # options only: imports no vLLM

ENGINE_ENVIRONMENT = {
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    "VLLM_HOST_IP": "127.0.0.1",  # an engine start hung for minutes without it on the GPU machine
    "HF_HUB_OFFLINE": "1",  # the GPU machine has no network
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",  # contexts past the shapes' max_position_embeddings
}


def set_engine_environment(**extra: str) -> None:
    """The engine environment of every benchmark (user settings win): call before vLLM is imported."""
    for key, value in {**ENGINE_ENVIRONMENT, **extra}.items():
        os.environ.setdefault(key, value)


# ---------------------------------------------------------------- shapes and cases

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 262144, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False,
}
LLAMA2_7B = {
    **LLAMA3_8B, "intermediate_size": 11008, "num_key_value_heads": 32, "vocab_size": 32000,
    "rope_theta": 10000.0, "max_position_embeddings": 32768, "bos_token_id": 1, "eos_token_id": 2,
}
# Qwen3-30B-A3B (its config.json): sparse-MoE MLPs, 128 experts of which 8 per token, q/k norms.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None,
}
# kv_capacity.py: name -> (config, pattern folder, sparsity, max_model_len). A pattern folder of
# None: no DuoAttention pattern was published for the shape; it serves seeded random gates
# (``case_pattern``).
SHAPES = {
    "llama3-8b-gqa-50": (LLAMA3_8B, "Llama-3-8B-Instruct-Gradient-1048k", 0.5, 131072),
    "llama2-7b-mha-25": (LLAMA2_7B, "Llama-2-7B-32K-Instruct", 0.75, 32768),
    "qwen3-30b-a3b-moe-50": (QWEN3_30B_A3B, None, 0.5, 40960),
}
# kv_capacity.py measures these unless --shapes names others (the MoE shape's 61 GB of weights
# leave an 80 GB card little KV in bf16: ask for it by name).
DEFAULT_SHAPES = ("llama3-8b-gqa-50", "llama2-7b-mha-25")
# duo_speed.py and profile_decode.py: batch-1 lengths and (length, count) throughput workloads.
# Scripts that change a case for one run copy it (``{**CASES[name], ...}``): this table stays as is.
CASES = {
    "llama3-8b-gqa-50": {"config": LLAMA3_8B, "pattern": "Llama-3-8B-Instruct-Gradient-1048k", "sparsity": 0.5,
                         "lengths": [32768, 131072], "throughput": [(2048, 128), (32768, 32)]},
    "llama2-7b-mha-25": {"config": {**LLAMA2_7B, "max_position_embeddings": 131072},
                         "pattern": "Llama-2-7B-32K-Instruct", "sparsity": 0.75, "lengths": [32768, 65536],
                         "throughput": []},
    "qwen3-30b-a3b-moe-50": {"config": QWEN3_30B_A3B, "pattern": None, "sparsity": 0.5,
                             "lengths": [16384, 40960], "throughput": [(16384, 32)]},
}


def case_pattern(pattern: str | None, config: dict, sparsity: float, patterns: str | None, seed: int = 0) -> str:
    """The pattern folder a case serves: the published one under ``patterns``, or for a shape with
    none published, seeded uniform random gates of its layers x KV heads written to a fresh folder.
    Random gates are enough there: on random weights only how many heads stream matters (KV
    capacity and speed), not which; quality is measured on real models (``duo_vllm.eval``)."""
    if pattern is not None:
        if not patterns:
            raise SystemExit(f"--patterns is required for {pattern} (the folder of the published DuoAttention patterns)")
        return str(Path(patterns) / pattern)
    import numpy as np

    from duo_vllm.config import DEFAULT_RECENT, DEFAULT_SINK
    from duo_vllm.pattern import HeadPattern
    from duo_vllm.pattern_io import save_pattern

    shape = (config["num_hidden_layers"], config["num_key_value_heads"])
    gates = np.random.default_rng(seed).random(shape).astype(np.float32)
    folder = Path(tempfile.mkdtemp(prefix="duo-shape-pattern-"))
    save_pattern(HeadPattern(gates, sink_size=DEFAULT_SINK, recent_size=DEFAULT_RECENT,
                             model_name=config["architectures"][0], sparsity=sparsity,
                             provenance={"derivation": f"uniform random gates, seed {seed}, for a random-weight "
                                                       f"{config['model_type']} shape (no published pattern)"}),
                 folder)
    return str(folder)

# --backends: each engine's DUO options from the case's (None: stock FLASH_ATTN). The variants
# change one option.
BACKENDS = {"stock": lambda duo: None, "duo": lambda duo: duo,
            "duo-gather": lambda duo: {**duo, "reorder_heads": False},
            "duo-overlap": lambda duo: {**duo, "overlap_streaming": True}}


def parse_backends(parser, text: str) -> list[str]:
    """``--backends`` as a list of BACKENDS names (an unknown name is a usage error)."""
    backends = text.split(",")
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown --backends {sorted(unknown)}: choose from {', '.join(BACKENDS)}")
    return backends


def json_object(text: str) -> dict:
    """argparse type of the JSON-object options (``--attention-config``, ``--duo-options``)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


json_object.__name__ = "JSON object"  # argparse names the type in its error: "invalid JSON object value"


# ---------------------------------------------------------------- engines


def model_dir(config: dict) -> str:
    """A folder holding only ``config.json``: with ``load_format="dummy"``, a model of that shape."""
    folder = Path(tempfile.mkdtemp(prefix="duo-shape-"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def engine_kwargs(model: str, max_model_len: int, gpu_util: float, duo: dict | None, kernel: str | None = None,
                  **extra) -> dict:
    """LLM(...) arguments for a random-weight model of a real shape; DUO when ``duo`` is given.
    ``kernel`` ("flash_attn" or "flashinfer"): stock's attention backend and DUO's for its
    retrieval heads (None: vLLM's choice for the card, and DUO's "auto")."""
    kwargs = dict(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=max_model_len, gpu_memory_utilization=gpu_util, seed=0, **extra)
    if duo is not None:
        kwargs.update(attention_backend="DUO", additional_config={"duo": with_kernel(duo, kernel)})
    elif kernel is not None:
        kwargs.update(attention_backend=kernel.upper())
    return kwargs


# Stock's attention backend and DUO's option "kernel" to match (--kernel of the benchmarks):
# DUO's choices but "auto", which names no stock backend.
KERNELS = tuple(k for k in DUO_KERNELS if k != "auto")


def with_kernel(duo: dict, kernel: str | None) -> dict:
    """DUO options running the retrieval heads through ``kernel`` (unchanged for None)."""
    return duo if kernel is None else {**duo, "kernel": kernel}


def synthetic_prompt(num_tokens: int, offset: int = 0):
    """A deterministic token-id prompt (dummy weights: the content does not matter); prompts with
    different offsets share no prefix."""
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=[((i + offset) * 7919) % 30000 + 100 for i in range(num_tokens)])


def duo_report(engine_kwargs: dict) -> dict:
    """DUO's own KV report for these engine arguments (planned from the config, no engine).

    Built from a fresh config: after start-up vLLM rewrites the running engine's block size to
    the smallest KV-cache group's.
    """
    from dataclasses import asdict

    from vllm.engine.arg_utils import EngineArgs

    from duo_vllm.kv_cache.report import kv_report

    config = EngineArgs(**engine_kwargs).create_engine_config()
    return asdict(kv_report(config, context_len=config.model_config.max_model_len))


# ---------------------------------------------------------------- floors

# name fragment of torch.cuda.get_device_name() -> (HBM bytes/s, dense bf16 FLOP/s); first match wins
DEVICES = {
    "H100 PCIe": (2.0e12, 756e12),
    "H100 NVL": (3.9e12, 835e12),
    "H100": (3.35e12, 989e12),  # SXM, HBM3
    "H200": (4.8e12, 989e12),
    "A100-SXM4-80GB": (2.039e12, 312e12),
    "A100 80GB PCIe": (1.935e12, 312e12),
}


@dataclass(frozen=True)
class DeviceFloors:
    """The figures the floors divide by: HBM bytes/s and dense bf16 FLOP/s."""

    bandwidth: float
    peak_flops: float

    def as_json(self) -> dict:
        """As result files record them (``"device_floors"``)."""
        return {"bandwidth_bytes_per_s": self.bandwidth, "peak_bf16_flops": self.peak_flops}


def device_floors(device: str, bandwidth: float | None = None, peak_flops: float | None = None) -> DeviceFloors:
    """The floors' figures for the GPU named ``device`` (``torch.cuda.get_device_name(0)``), each
    overridden when given; refuse to guess for a GPU not in ``DEVICES`` unless both are given."""
    for name, value in (("--bandwidth", bandwidth), ("--peak-flops", peak_flops)):
        if value is not None and value <= 0:
            raise SystemExit(f"{name} {value}: must be positive")
    known = next((spec for fragment, spec in DEVICES.items() if fragment in device), None)
    if known is None and (bandwidth is None or peak_flops is None):
        raise SystemExit(f"no floor figures for {device!r}: pass --bandwidth BYTES_PER_S and --peak-flops FLOPS")
    return DeviceFloors(bandwidth=bandwidth if bandwidth is not None else known[0],
                        peak_flops=peak_flops if peak_flops is not None else known[1])


def parameters(config: dict, *, active: bool = True) -> int:
    """Weights of a Llama-style config (attention, gated MLP, embeddings and LM head); for sparse-MoE
    MLPs (Qwen3-MoE's ``num_experts``, Mixtral's ``num_local_experts``, Qwen2-MoE's shared expert)
    the weights one token runs through (``active``: its top-k experts, the router and any shared
    expert), else every expert. Raises ValueError for DeepSeek-style layouts (``n_routed_experts`` /
    ``n_shared_experts``, MLA), whose count this does not know."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    attn = h * config["num_attention_heads"] * d * 2 + h * config["num_key_value_heads"] * d * 2
    embed = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    if "n_routed_experts" in config or "n_shared_experts" in config:
        raise ValueError("parameters(): MoE layouts with shared or routed-expert groups are not counted here")
    experts = config.get("num_experts") or config.get("num_local_experts")
    if not experts:
        return layers * (attn + 3 * h * config["intermediate_size"]) + embed
    expert_inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    used = config["num_experts_per_tok"] if active else experts
    moe_mlp = used * 3 * h * expert_inter + h * experts  # the experts a token runs, and the router
    shared = config.get("shared_expert_intermediate_size")
    if shared:  # Qwen2-MoE: a shared expert every token runs, and its gate
        moe_mlp += 3 * h * shared + h
    dense_mlp = 3 * h * config["intermediate_size"]
    step, dense_layers = config.get("decoder_sparse_step", 1) or 1, set(config.get("mlp_only_layers") or ())
    mlps = sum(dense_mlp if (i in dense_layers or (i + 1) % step) else moe_mlp for i in range(layers))
    return layers * attn + mlps + embed


def floors(config: dict, report: dict, n: int, device: DeviceFloors) -> dict:
    """Decode (bandwidth) and prefill (compute) floors at context n, stock and DUO. ``report`` is
    ``duo_report``'s plus ``streaming_window_tokens`` (sink + recent)."""
    params = parameters(config)
    layers, q_heads = config["num_hidden_layers"], config["num_attention_heads"]
    d = config.get("head_dim", config["hidden_size"] // q_heads)
    retrieval = report["retrieval_bytes_per_token"] / report["stock_bytes_per_token"]
    window = report["streaming_window_tokens"]
    attn_full = layers * q_heads * 2 * d * n * n  # causal: 4 d n^2 / 2 per head
    attn_duo = retrieval * attn_full + (1 - retrieval) * layers * q_heads * 4 * d * n * window
    return {
        "stock_decode_ms": (2 * params + report["stock_bytes_per_token"] * n) / device.bandwidth * 1e3,
        "duo_decode_ms": (2 * params + report["retrieval_bytes_per_token"] * n
                          + report["streaming_bytes_per_request"]) / device.bandwidth * 1e3,
        "stock_prefill_s": (2 * params * n + attn_full) / device.peak_flops,
        "duo_prefill_s": (2 * params * n + attn_duo) / device.peak_flops,
    }
