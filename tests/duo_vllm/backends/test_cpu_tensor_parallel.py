"""DUO with tensor parallelism 2 and 4 on CPU: the same greedy tokens as TP 1 and as the reference.

Needs a model whose KV heads split over two ranks: a small random Qwen2 (4 layers, 4 query / 2 KV
heads, q/k/v biases; ``tests/helpers/tiny_models.py``): one KV head per rank at TP 2, and at TP 4
each KV head replicated on two ranks (vLLM's split when ranks outnumber KV heads). (Before, the test
used Qwen2.5-Coder-0.5B, whose weights are an evaluation fixture CI does not install, so CI
skipped it.)

A random 50% pattern puts, in some layers, the retrieval head on one rank and the streaming head
on the other (the ranks' KV layouts then differ and are padded to the same slots); sink 16 /
recent 64 with a 700-token prompt, so the streaming heads do drop context.
"""

from __future__ import annotations

import os

import pytest
import torch

from duo_vllm.pattern_io import load_pattern
from tests.duo_vllm.patterns_for_tests import random_pattern_dir
from tests.helpers.llm import greedy_tokens, offline_llm
from tests.helpers.tiny_models import NUM_KV_HEADS, NUM_LAYERS, save_tiny_model

pytestmark = pytest.mark.slow

SINK, RECENT, SPARSITY, NEW_TOKENS = 16, 64, 0.5, 16


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, smollm2):
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    save_tiny_model(folder, "qwen2", smollm2)
    return str(folder)


@pytest.fixture(scope="module")
def setup(qwen, tmp_path_factory):
    from transformers import AutoTokenizer

    from duo_vllm.testing.haystack import haystack_tokens

    tok = AutoTokenizer.from_pretrained(qwen)
    prompts = [tok("def quicksort(items):").input_ids, haystack_tokens(tok, 700, offset=0)]
    pattern = random_pattern_dir(tmp_path_factory.mktemp("pattern"), num_layers=NUM_LAYERS,
                                 num_kv_heads=NUM_KV_HEADS, seed=2)
    mask = load_pattern(pattern).binarize(sparsity=SPARSITY)
    # the case the test is about: a layer whose two KV heads (one per rank) are of different kinds
    assert (mask[:, 0] != mask[:, 1]).any() and mask.any() and not mask.all()
    options = {"duo": {"pattern": pattern, "sparsity": SPARSITY, "sink": SINK, "recent": RECENT}}
    return prompts, mask, options


def duo_tokens(model, prompts, options, tp: int) -> list[list[int]]:
    # Several ranks need vLLM's worker processes, each with its own (small) KV pool; one rank runs
    # in-process.
    pool = {} if tp == 1 else {"kv_cache_memory_bytes": 64 * 2**20}
    with offline_llm(model, in_process=tp == 1, attention_backend="DUO", additional_config=options, tensor_parallel_size=tp,
                     dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=4, seed=0, **pool) as llm:
        return greedy_tokens(llm, prompts, NEW_TOKENS)


def reference_tokens(model, prompts, mask, *, duo: bool) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    from duo_vllm.reference import use_duo_reference

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    if duo:
        use_duo_reference(hf, mask, sink=SINK, recent=RECENT)
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False, pad_token_id=hf.config.eos_token_id)
            out.append(generated[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def tp1_and_reference(qwen, setup):
    prompts, mask, options = setup
    tp1 = duo_tokens(qwen, prompts, options, tp=1)
    reference = reference_tokens(qwen, prompts, mask, duo=True)
    assert tp1 == reference, f"DUO {tp1} vs the plain-torch reference {reference}"
    # not vacuous: full attention continues the long prompt differently
    full = reference_tokens(qwen, prompts[1:], mask, duo=False)
    assert full[0] != reference[1], "the pattern does not change the long prompt's tokens"
    return tp1


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_gives_the_tp1_and_reference_tokens(qwen, setup, tp1_and_reference, tp, monkeypatch):
    prompts, _, options = setup
    # vLLM's CPU workers bind their OpenMP threads per NUMA node; this machine has one node, so
    # the ranks are given cores in turn (sharing them when there are more ranks than cores), and
    # vLLM-CPU's legacy KV-size variable would override each rank's pool.
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cores[rank % len(cores)]) for rank in range(tp)))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    tokens = duo_tokens(qwen, prompts, options, tp=tp)
    assert tokens == tp1_and_reference, f"TP {tp} {tokens} vs TP 1 {tp1_and_reference}"
