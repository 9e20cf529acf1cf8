"""Offline generation with DuoAttention on SmolLM2-135M-Instruct (CPU), with the shipped pattern.

Run: .venv/bin/python examples/generate_duo.py [--sparsity 0.5] [--context 2000]
It builds a long prompt (a passage of public-domain text with a pass key hidden in it), asks the
model for the key with DUO, and prints the answer and the timing (the DUO start-up line is in the
log above it). Seen on our 2-core CPU: 'The pass key is 58213.' for a 1558-token prompt.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pattern", default=None, help="pattern folder (default: the shipped one for the model)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming KV heads")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--context", type=int, default=1500, help="haystack tokens in the prompt")
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from duo_vllm.testing.haystack import haystack_tokens
    from duo_vllm.testing.models import smollm2_path

    model = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer.decode(haystack_tokens(tokenizer, args.context))
    cut = len(text) // 3
    haystack = text[:cut] + " The pass key is 58213. Remember it. " + text[cut:]
    messages = [{"role": "user", "content": haystack + "\n\nWhat is the pass key? Answer with the number."}]

    duo = {"sparsity": args.sparsity, "sink": args.sink, "recent": args.recent}
    if args.pattern:
        duo["pattern"] = args.pattern
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=4096, seed=0,
              attention_backend="DUO", additional_config={"duo": duo})
    start = time.perf_counter()
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24))
    elapsed = time.perf_counter() - start
    print(f"\nDUO answer ({len(out[0].prompt_token_ids)} prompt tokens, {elapsed:.2f} s): "
          f"{out[0].outputs[0].text!r}")


if __name__ == "__main__":
    main()
