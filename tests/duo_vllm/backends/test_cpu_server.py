"""`vllm serve MODEL --attention-backend DUO` answers OpenAI clients, with spawned engine processes.

The server runs with ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` so the DUO backend enum member has to
survive pickling into a process that has not loaded plugins yet (the offline tests run forked).
"""

from __future__ import annotations

import json

import pytest

from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.server import vllm_server

pytestmark = pytest.mark.slow

CHUNK = 256  # prefill tokens per step: the seeded prompts below take several steps


def test_serve_duo_completions_chat_and_streaming(smollm2, smollm2_tokenizer, tmp_path):
    pattern = random_pattern_dir(tmp_path / "pattern", num_layers=30, num_kv_heads=3, seed=3)
    duo = {"duo": {"pattern": pattern, "sparsity": 0.5, "sink": 16, "recent": 64}}
    with vllm_server(smollm2, "--attention-backend", "DUO", "--additional-config", json.dumps(duo),
                     "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "2048",
                     "--max-num-batched-tokens", str(CHUNK),
                     env={"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}) as srv:
        log = srv.log_text()
        assert "DUO attention: pattern" in log and "sink 16, recent 64" in log, log[-3000:]
        # the KV layout is logged once, by the front end (which also puts it on /metrics)
        assert log.count("DUO KV cache: retrieval heads") == 1, log[-3000:]
        client = srv.client()
        model = client.models.list().data[0].id

        completion = client.completions.create(model=model, prompt="The capital of France is",
                                               max_tokens=8, temperature=0)
        assert completion.choices[0].text.strip()

        messages = [{"role": "user", "content": "Say hello in French."}]
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
        text = chat.choices[0].message.content
        assert text and text.strip()

        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                                temperature=0, stream=True)
        pieces, finish = [], None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == text, "streamed chat differs from the same request unstreamed"
        assert finish in ("stop", "length")

        # A malformed request is refused with a 4xx and the server keeps serving.
        import openai

        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="x", max_tokens=-3)
        again = client.completions.create(model=model, prompt="The capital of France is",
                                          max_tokens=8, temperature=0)
        assert again.choices[0].text == completion.choices[0].text

        # Concurrent seeded requests, each prompt several prefill chunks long: vLLM-CPU discards
        # (and rewinds the generator of) every chunk's sampled token, which killed the engine
        # before patches/cpu_seeded_sampling.py. All are answered and the server stays up.
        from concurrent.futures import ThreadPoolExecutor

        from duo_vllm.testing.haystack import haystack_tokens

        texts = [smollm2_tokenizer.decode(haystack_tokens(smollm2_tokenizer, 900, offset=50 * i)) for i in range(6)]

        def seeded(i):
            return client.completions.create(model=model, prompt=texts[i], max_tokens=8, temperature=1.0,
                                             seed=100 + i)

        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(seeded, range(len(texts))))
        assert all(a.usage.prompt_tokens > 2 * CHUNK and 0 < a.usage.completion_tokens <= 8 for a in answers)
        alive = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                          temperature=0)
        assert alive.choices[0].text == completion.choices[0].text
    assert "CPU Generator does not use offset" not in srv.log_text()
