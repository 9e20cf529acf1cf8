"""Needle check through vLLM: multi-passkey retrieval at one context length, per engine setting.

The samples are ``gate_training``'s held-out passkey samples (the needle check's own, over the
Canterbury corpus), scored as ``gate_training.needle`` scores them: teacher-forced, the share of the
answer's tokens (five 16-word passkeys) that are the engine's top-1 next token (``exact`` when all).
Runs are ``NAME=BACKEND:KV_CACHE_DTYPE`` (BACKEND: ``stock`` = FLASH_ATTN, ``duo`` = the shipped
pattern of the model, or ``--pattern``), one engine at a time, each with vLLM's defaults (CUDA
graphs, chunked prefill, prefix caching). Writes JSON and prints a table last.

    python benchmarks/needle_vllm.py --model qwen-coder-0.5b --context 32000 \
        --runs stock-fp8=stock:fp8,duo-bf16=duo:auto,duo-fp8=duo:fp8 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEEDLE_INDEX = 2_000_029  # gate_training.needle's held-out sample indices


def samples(path: str, context: int, count: int, seed: int) -> list[dict]:
    from transformers import AutoTokenizer

    from gate_training.data import PasskeySpec, make_sample

    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = PasskeySpec(num_samples=count, min_context=context, max_context=context, num_lengths=1,
                       num_passkeys=5, passkey_length=16, seed=seed)
    return [make_sample(tokenizer, spec, NEEDLE_INDEX + k, context) for k in range(count)]


def run_engine(path: str, backend: str, kv_cache_dtype: str, data: list[dict], args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=path, dtype="bfloat16", max_model_len=args.context + 512, seed=0,
                  gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=kv_cache_dtype)
    if backend == "duo":
        duo = {"pattern": args.pattern} if args.pattern else {}
        kwargs.update(attention_backend="DUO", additional_config={"duo": duo})
    else:
        kwargs.update(attention_backend="FLASH_ATTN")
    started = time.time()
    llm = LLM(**kwargs)
    start_s = time.time() - started
    # Teacher-forced, as gate_training.needle scores it: at every answer position, is the
    # engine's top-1 next token the passkey's token?
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    t = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(s["input_ids"])) for s in data], params, use_tqdm=False)
    scores = []
    for out, sample in zip(outs, data):
        ids, start = list(sample["input_ids"]), int(sample["answer_start"])
        top1 = [next(tok for tok, lp in out.prompt_logprobs[i].items() if lp.rank == 1) for i in range(start, len(ids))]
        right = sum(a == b for a, b in zip(top1, ids[start:]))
        scores.append({"token_accuracy": round(right / (len(ids) - start), 4), "exact": right == len(ids) - start})
    result = {"backend": backend, "kv_cache_dtype": kv_cache_dtype, "start_s": round(start_s, 1),
              "generate_s": round(time.time() - t, 1),
              "kv_tokens": llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens,
              "token_accuracy": round(sum(s["token_accuracy"] for s in scores) / len(scores), 4),
              "exact_samples": sum(s["exact"] for s in scores), "per_sample": scores}
    llm.llm_engine.engine_core.shutdown(timeout=60)
    del llm
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen-coder-0.5b", help="qwen-coder-0.5b, smollm2, or a model folder")
    parser.add_argument("--pattern", help="DUO pattern (default: the shipped one for the model)")
    parser.add_argument("--context", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="stock-fp8=stock:fp8,duo-bf16=duo:auto,duo-fp8=duo:fp8")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    runs = []
    for item in args.runs.split(","):
        name, _, spec = item.partition("=")
        backend, _, kv_cache_dtype = spec.partition(":")
        if not name or backend not in ("stock", "duo") or not kv_cache_dtype:
            parser.error(f"--runs item {item!r}: expected NAME=BACKEND:KV_CACHE_DTYPE with BACKEND stock or duo, "
                         "e.g. duo-fp8=duo:fp8")
        runs.append((name, backend, kv_cache_dtype))
    import torch
    import vllm

    from duo_vllm.testing.models import resolve_short_name

    path = resolve_short_name(args.model)
    data = samples(path, args.context, args.samples, args.seed)
    result = {"device": torch.cuda.get_device_name(0), "vllm": vllm.__version__, "model": Path(path).name,
              "context": args.context, "prompt_tokens": [int(s["answer_start"]) for s in data],
              "samples": args.samples, "passkeys_per_sample": 5,
              "command": " ".join(["python", "benchmarks/needle_vllm.py", *sys.argv[1:]]), "runs": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, backend, kv_cache_dtype in runs:
        result["runs"][name] = run_engine(path, backend, kv_cache_dtype, data, args)
        print(name, json.dumps(result["runs"][name]), flush=True)
        (out / "needle_vllm.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}, vLLM {result['vllm']}, {result['model']}, {args.context}-token contexts, "
          f"{args.samples} samples x 5 passkeys")
    print(f"{'run':<12} {'token acc':>9} {'exact':>6} {'KV tokens':>10}")
    for name, r in result["runs"].items():
        print(f"{name:<12} {r['token_accuracy']:>9.3f} {r['exact_samples']:>3}/{args.samples} {r['kv_tokens']:>10,}")


if __name__ == "__main__":
    main()
    os._exit(0)  # an LLM can hang at interpreter exit on the GPU machine
