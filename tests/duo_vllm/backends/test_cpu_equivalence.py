"""DUO on vLLM's CPU platform equals stock CPU_ATTN where the method says it must.

- every head retrieval: the same greedy tokens as stock, token for token;
- every head streaming with sink + recent longer than any prompt: likewise.
A batch of varied prompts (lengths 6..~1000 tokens, raw text and chat) runs in one generate call,
so prefills and decodes of different requests are mixed in the same steps. The same engines also
run beam search (width 3: forked beams share their prompt's blocks) and seeded sampling of 3
completions per prompt, which must equal stock's too.
"""

from __future__ import annotations

import pytest

from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.llm import greedy_tokens, offline_llm

pytestmark = pytest.mark.slow

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    from duo_vllm.testing.haystack import haystack_tokens

    chat = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours of the rainbow."}],
        tokenize=False, add_generation_prompt=True)
    texts = ["The capital of France is", "def fibonacci(n):", chat]
    long = [haystack_tokens(smollm2_tokenizer, n, offset=o) for n, o in ((211, 0), (600, 5000), (1000, 20000))]
    return texts + long


def decode_all_ways(llm, prompts) -> dict:
    """Greedy tokens, beam-search beams and seeded samples (n=3) for ``prompts``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    token_prompts = [{"prompt_token_ids": p} for p in prompts if isinstance(p, list)]
    beams = llm.beam_search(token_prompts, BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True))
    sampled = llm.generate([TokensPrompt(prompt_token_ids=p["prompt_token_ids"]) for p in token_prompts],
                           SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)
    return {"greedy": greedy_tokens(llm, prompts, NEW_TOKENS),
            "beams": [[list(s.tokens) for s in b.sequences] for b in beams],
            "sampled": [[list(c.token_ids) for c in o.outputs] for o in sampled]}


@pytest.fixture(scope="module")
def stock_tokens(smollm2, prompts):
    with offline_llm(smollm2, **ENGINE) as llm:
        return decode_all_ways(llm, prompts)


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    return random_pattern_dir(tmp_path_factory.mktemp("pattern"), num_layers=30, num_kv_heads=3, seed=1)


@pytest.mark.parametrize(
    "duo",
    [
        pytest.param({"sparsity": 0.0}, id="all-retrieval"),
        # 1000 + 24 tokens < sink + recent: a streaming head then sees everything, like full attention.
        pytest.param({"sparsity": 1.0, "sink": 512, "recent": 544}, id="all-streaming-wide"),
    ],
)
def test_duo_matches_stock(smollm2, prompts, stock_tokens, pattern, duo):
    with offline_llm(smollm2, attention_backend="DUO",
                     additional_config={"duo": {"pattern": pattern, **duo}}, **ENGINE) as llm:
        duo_tokens = decode_all_ways(llm, prompts)
    for way in ("greedy", "beams", "sampled"):
        assert len(duo_tokens[way]) == len(stock_tokens[way]) > 0
        for i, (got, want) in enumerate(zip(duo_tokens[way], stock_tokens[way])):
            assert got == want, f"DUO {duo}, {way}: differs from CPU_ATTN on prompt {i}: {got} vs {want}"
    # the sampled completions must differ from each other, or seeded sampling checked nothing
    assert any(len({tuple(c) for c in completions}) > 1 for completions in stock_tokens["sampled"])

