"""Ask a DUO server (examples/serve_duo.sh, or any `vllm serve ... --attention-backend DUO`) with the
official `openai` client: a completion, a streamed chat answer, and a pass key hidden in a long
passage of public-domain text, the case DUO is for.

Run: .venv/bin/python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--context 1500]
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--context", type=int, default=1500, help="haystack tokens around the pass key")
    args = parser.parse_args(argv)

    import openai
    from transformers import AutoTokenizer

    from duo_vllm.testing.haystack import haystack_tokens

    client = openai.OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = client.models.list().data[0].id
    print(f"model: {model}")

    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
    print(f"completion: {completion.choices[0].text!r}")

    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello in French."}],
                                            max_tokens=16, temperature=0, stream=True)
    print("streamed chat: " + "".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer.decode(haystack_tokens(tokenizer, args.context))
    cut = len(text) // 3
    passage = text[:cut] + " The pass key is 58213. Remember it. " + text[cut:]
    start = time.perf_counter()
    chat = client.chat.completions.create(
        model=model, max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": passage + "\n\nWhat is the pass key? Answer with the number."}])
    print(f"pass key ({chat.usage.prompt_tokens} prompt tokens, {time.perf_counter() - start:.2f} s): "
          f"{chat.choices[0].message.content!r}")


if __name__ == "__main__":
    main()
