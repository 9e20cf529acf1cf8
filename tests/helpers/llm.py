"""One offline vLLM engine at a time, shut down cleanly (tests share engines per module), and the
Hugging Face side of the log-prob comparisons."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext


@contextmanager
def offline_llm(model: str, *, in_process: bool = True, **kwargs) -> Iterator["vllm.LLM"]:  # noqa: F821
    """An offline engine for one test module, shut down on exit.

    ``in_process`` (the default) runs it under :func:`in_process_engines`. Tests that need vLLM's
    own processes (tensor parallelism, numba-based n-gram speculation) pass ``in_process=False``;
    the server tests and ``tests/test_stock_vllm.py`` keep the plugin covered in spawned processes.
    """
    from vllm import LLM

    with in_process_engines() if in_process else nullcontext():
        if in_process:
            kwargs.setdefault("distributed_executor_backend", "uni")
        llm = LLM(model=model, **kwargs)
        try:
            yield llm
        finally:
            # vLLM 0.32's LLM has no shutdown(); its engine-core client does. The CPU worker takes a
            # few seconds to exit, so give it more than the default 5 s grace.
            llm.llm_engine.engine_core.shutdown(timeout=30)
            del llm
            gc.collect()


@contextmanager
def in_process_engines() -> Iterator[None]:
    """vLLM engines started inside this block run in the test process: engine core in-process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); pass ``distributed_executor_backend="uni"`` for the
    worker. On our 2-core machines an engine then starts in ~3 s instead of ~30 s, most of which
    went to two spawned processes importing torch and vLLM.

    What such engines leave behind in the process is undone on exit, so the next engine or
    reference computation starts clean: vLLM's distributed groups, and ``torch.set_num_threads``,
    which vLLM's CPU worker replaces process-wide with a no-op after binding its threads.
    """
    import os
    from unittest import mock

    import torch

    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    try:
        with mock.patch.dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"):
            yield
    finally:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def greedy_tokens(llm, prompts, max_tokens: int) -> list[list[int]]:
    """Greedy output token ids for ``prompts`` (strings or token-id lists)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
    outputs = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def seeded_tokens(llm, prompts, seeds, max_tokens: int) -> list[list[int]]:
    """Output token ids of ``prompts`` (token-id lists) sampled at temperature 1, one seed each."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True) for seed in seeds]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def hf_prompt_logprobs(model, prompts) -> list:
    """Log-prob of every prompt token after the first under a Hugging Face causal LM (numpy arrays,
    one per prompt), as vLLM's ``prompt_logprobs`` report them."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            lp = torch.log_softmax(model(x).logits[0].float(), -1)
            out.append(lp[:-1].gather(1, x[0, 1:, None]).squeeze(1).numpy())
    return out
