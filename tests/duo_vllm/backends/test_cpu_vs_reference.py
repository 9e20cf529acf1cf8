"""DUO in vLLM (CPU) against the plain-torch DuoAttention reference on the real model.

A 50% pattern with a small sink/window (16/64) on prompts of 0.6-2.5K tokens (up to 39 windows
long: past the first window the streaming heads' view no longer depends on length): vLLM's next-token
log-probabilities at every prompt position match a Hugging Face run of the same model whose
attention is ``duo_vllm.reference`` (fp32 both sides), and greedy generations agree for 32 tokens.
Chunked prefill (128-token steps, in a compiled engine) and prefix-cache hits give the tokens of
one-shot prefill, for greedy and for seeded sampling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duo_vllm.pattern_io import load_pattern
from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.llm import greedy_tokens, offline_llm, seeded_tokens

pytestmark = pytest.mark.slow

SINK, RECENT, SPARSITY = 16, 64, 0.5
NEW_TOKENS = 32
LENGTHS = (600, 1300, 2500)
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=2600, seed=0)
LOGPROB_ATOL = 2e-2
SEEDS = (11, 12, 11)  # per prompt; sampled at temperature 1


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    return random_pattern_dir(tmp_path_factory.mktemp("pattern"), num_layers=30, num_kv_heads=3, seed=2)


@pytest.fixture(scope="module")
def duo_options(pattern):
    return {"duo": {"pattern": pattern, "sparsity": SPARSITY, "sink": SINK, "recent": RECENT}}


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    from duo_vllm.testing.haystack import haystack_tokens

    question = smollm2_tokenizer.encode("\n\nSummarise the passage above in one sentence:",
                                        add_special_tokens=False)
    return [haystack_tokens(smollm2_tokenizer, n - len(question), offset=7 * n) + question for n in LENGTHS]


def reference_run(smollm2, pattern, prompts, sparsity, *, full_control=True):
    """Log-probs of every prompt token and greedy continuations from HF + the DUO reference."""
    from transformers import AutoModelForCausalLM

    from duo_vllm.reference import use_duo_reference

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    mask = load_pattern(pattern).binarize(sparsity=sparsity)
    use_duo_reference(model, mask, sink=SINK, recent=RECENT)
    logprobs, continuations = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model(x, use_cache=True)
            lp = torch.log_softmax(out.logits[0].float(), -1)
            logprobs.append(lp[:-1].gather(1, x[0, 1:, None]).squeeze(1).numpy())
            # Greedy continuation from the prefilled cache (no EOS stop, like vLLM's ignore_eos).
            past, token, tokens = out.past_key_values, int(lp[-1].argmax()), []
            for _ in range(NEW_TOKENS):
                tokens.append(token)
                step = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = step.past_key_values, int(step.logits[0, -1].argmax())
            continuations.append(tokens)
    result = {"logprobs": logprobs, "greedy": continuations}
    if full_control:
        # Full attention control: the pattern must matter at these lengths, or the test proves nothing.
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            x = torch.tensor([prompts[-1]])
            lp = torch.log_softmax(model(x).logits[0].float(), -1)
            result["full_last"] = lp[:-1].gather(1, x[0, 1:, None]).squeeze(1).numpy()
    return result


@pytest.fixture(scope="module")
def reference(smollm2, pattern, prompts):
    return reference_run(smollm2, pattern, prompts, SPARSITY)


def duo_prompt_logprobs(llm, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [np.array([lp[tok].logprob for lp, tok in zip(o.prompt_logprobs[1:], p[1:])])
            for o, p in zip(outs, prompts)]


@pytest.fixture(scope="module")
def one_shot(smollm2, duo_options, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with offline_llm(smollm2, attention_backend="DUO", additional_config=duo_options,
                     max_num_batched_tokens=8192, **ENGINE) as llm:
        logprobs = duo_prompt_logprobs(llm, prompts)
        first = greedy_tokens(llm, prompts, NEW_TOKENS)
        # Same prompts again: now served from the prefix cache.
        again = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                             SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
        seeded = seeded_tokens(llm, prompts, SEEDS, NEW_TOKENS)
        shared = prompts[2][:2048] + prompts[0][:300]  # hits the cached first 2048 tokens of prompt 2
        shared_out = llm.generate([TokensPrompt(prompt_token_ids=shared)],
                                  SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
        # Heads were reordered at load (retrieval first), so in-place weight reloads are refused.
        try:
            llm.collective_rpc("reload_weights")
            reload_refusal = None
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            reload_refusal = str(exc)
    return {
        "reload_refusal": reload_refusal, "seeded": seeded,
        "logprobs": logprobs, "greedy": first,
        "again": [list(o.outputs[0].token_ids) for o in again],
        "again_cached": [o.num_cached_tokens for o in again],
        "shared_prompt": shared, "shared": list(shared_out[0].outputs[0].token_ids),
        "shared_cached": shared_out[0].num_cached_tokens,
    }


@pytest.fixture(scope="module")
def chunked(smollm2, duo_options, prompts, one_shot):
    """128-token prefill chunks in vLLM's default mode (torch.compile, DUO attention as the graph's
    splitting op) rather than the eager mode of the other engines."""
    engine = {**ENGINE, "enforce_eager": False}
    with offline_llm(smollm2, attention_backend="DUO", additional_config=duo_options,
                     max_num_batched_tokens=128, enable_prefix_caching=False, **engine) as llm:
        return {"greedy": greedy_tokens(llm, prompts + [one_shot["shared_prompt"]], NEW_TOKENS),
                "seeded": seeded_tokens(llm, prompts, SEEDS, NEW_TOKENS),
                "mode": llm.llm_engine.vllm_config.compilation_config.mode}


@pytest.mark.parametrize("index", range(len(LENGTHS)), ids=[f"{n}tok" for n in LENGTHS])
def test_prompt_logprobs_match_reference(one_shot, reference, index):
    got, want = one_shot["logprobs"][index], reference["logprobs"][index]
    assert got.shape == want.shape
    err = np.abs(got - want)
    worst = int(err.argmax())
    assert err.max() < LOGPROB_ATOL, (
        f"DUO log-prob differs from the reference at position {worst + 1} of {LENGTHS[index]}: "
        f"{got[worst]:.5f} vs {want[worst]:.5f} (mean abs err {err.mean():.2e})")


def test_pattern_matters_at_these_lengths(reference):
    diff = np.abs(reference["logprobs"][-1] - reference["full_last"])
    assert diff.max() > 10 * LOGPROB_ATOL, "full attention and DUO agree: the comparison is vacuous"


def test_greedy_matches_reference(one_shot, reference):
    for i, (got, want) in enumerate(zip(one_shot["greedy"], reference["greedy"])):
        assert got == want, f"greedy tokens differ from the reference on the {LENGTHS[i]}-token prompt"


def test_prefix_cache_hits_give_same_tokens(one_shot, chunked, prompts):
    # All full blocks but the one holding the last prompt token come from the cache.
    assert all(c >= len(p) - 256 for c, p in zip(one_shot["again_cached"], prompts)), one_shot["again_cached"]
    assert one_shot["again"] == one_shot["greedy"]
    assert one_shot["shared_cached"] >= 1024
    assert one_shot["shared"] == chunked["greedy"][-1], "prefix-cache hit differs from a fresh prefill"


def test_reordered_engine_refuses_in_place_weight_reload(one_shot):
    """The engine above ran with its heads reordered (the default), and says how to reload."""
    assert one_shot["reload_refusal"] is not None
    assert "reorder_heads" in one_shot["reload_refusal"]


def test_chunked_prefill_gives_same_tokens(one_shot, chunked):
    assert chunked["greedy"][:-1] == one_shot["greedy"]


def test_seeded_sampling_survives_chunked_prefill(one_shot, chunked):
    """Seeded requests split into 128-token prefill chunks (each chunk's sampled token discarded)
    sample the tokens of one-shot prefill, and the engine lives (patches/cpu_seeded_sampling.py)."""
    assert chunked["seeded"] == one_shot["seeded"]
    assert one_shot["seeded"] != one_shot["greedy"], "temperature-1 sampling gave the greedy tokens"


def test_quarter_retrieval_with_small_streaming_blocks(smollm2, pattern, prompts):
    """25% retrieval: the streaming group gets smaller blocks than the retrieval group (32 vs 128
    tokens), so chunk boundaries, gap freeing and prefix hits run on two block sizes. Prompt
    log-probs match the reference; chunked prefill and a prefix-cache hit give the same tokens.
    Heads keep the checkpoint's order here (``reorder_heads`` false: retrieval heads gathered at
    every step), the path the other tests' engines (reordered at load) do not take."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sparsity, prompt = 0.75, prompts[1]
    options = {"duo": {"pattern": pattern, "sparsity": sparsity, "sink": SINK, "recent": RECENT,
                       "reorder_heads": False}}
    want = reference_run(smollm2, pattern, [prompt], sparsity, full_control=False)
    with offline_llm(smollm2, attention_backend="DUO", additional_config=options,
                     max_num_batched_tokens=512, **ENGINE) as llm:
        got = duo_prompt_logprobs(llm, [prompt])[0]
        first = greedy_tokens(llm, [prompt], NEW_TOKENS)[0]
        again = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                             SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                             use_tqdm=False)[0]
    err = np.abs(got - want["logprobs"][0])
    assert err.max() < LOGPROB_ATOL, f"max log-prob error {err.max():.3e} at {int(err.argmax()) + 1}"
    assert first == want["greedy"][0]
    assert again.num_cached_tokens >= len(prompt) - 256
    assert list(again.outputs[0].token_ids) == first


def test_compiled_engine_gives_the_reference_tokens(chunked, reference):
    """The chunked-prefill engine runs vLLM's default mode (torch.compile) and still gives the
    reference's greedy tokens on every prompt (the eager engines are checked above)."""
    from vllm.config import CompilationMode

    assert chunked["mode"] is not None and chunked["mode"] != CompilationMode.NONE, \
        f"the engine did not compile ({chunked['mode']!r})"
    assert chunked["greedy"][:-1] == reference["greedy"]
