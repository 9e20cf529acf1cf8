"""Stock vLLM 0.32 (CPU) on the SmolLM2 test model, offline and through `vllm serve`.

These tests pin down what the rest of the suite builds on: the converted model loads in vLLM, greedy
decoding agrees with Hugging Face transformers, the OpenAI-compatible server answers completions,
chat and streaming chat, and both the offline engine and the server shut down without leaving
processes behind.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import time

import psutil
import pytest

from tests.helpers.server import vllm_server

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
CAPITAL = PROMPTS[0]
MAX_TOKENS = 16
MATCH_TOKENS = 8
ENGINE_ARGS = dict(dtype="bfloat16", enforce_eager=True, max_model_len=4096, seed=0)


@pytest.fixture(scope="module")
def hf_greedy(smollm2, smollm2_tokenizer) -> list[int]:
    """Greedy tokens of transformers for CAPITAL (reference for vLLM)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).eval()
    ids = smollm2_tokenizer(CAPITAL, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=smollm2_tokenizer.eos_token_id)
    del model
    gc.collect()
    return out[0, ids.shape[1]:].tolist()


def _python_children() -> set[int]:
    """Live descendants of this process, except multiprocessing's resource tracker.

    The tracker is a per-interpreter helper that multiprocessing starts on first use and keeps
    until the interpreter exits; it is not part of the engine.
    """
    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if "multiprocessing.resource_tracker" in " ".join(proc.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        pids.add(proc.pid)
    return pids


def _wait_no_new_children(before: set[int], timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = _python_children() - before
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


class _ForceKillRecorder(logging.Handler):
    """Collects vLLM's "[shutdown] ... force killing ..." warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "force killing" in message:
            self.messages.append(message)


@pytest.fixture(scope="module")
def llm(smollm2):
    from vllm import LLM

    before = _python_children()
    engine = LLM(model=smollm2, **ENGINE_ARGS)
    assert _python_children() - before, "expected an engine-core child process"
    yield engine
    # vLLM 0.32's LLM (and LLMEngine) has no shutdown(); the multiprocess engine-core client does.
    # Its default grace is 5 s, after which EngineCore is force-killed; its worker alone takes
    # ~4 s to exit on this CPU, so give it time to stop gracefully.
    forced = _ForceKillRecorder()
    logging.getLogger("vllm").addHandler(forced)
    try:
        engine.llm_engine.engine_core.shutdown(timeout=30)
    finally:
        logging.getLogger("vllm").removeHandler(forced)
    assert not forced.messages, f"engine shutdown was not graceful: {forced.messages}"
    del engine
    gc.collect()
    left = _wait_no_new_children(before)
    assert not left, "engine processes left after shutdown: " + ", ".join(
        f"{pid} {psutil.Process(pid).cmdline()}" for pid in left if psutil.pid_exists(pid))
    assert not multiprocessing.active_children()


# The server test comes first so that the module's offline engine is not running alongside it.
def test_server_completion_chat_and_stream(smollm2, hf_greedy, smollm2_tokenizer):
    with vllm_server(smollm2, "--dtype", "bfloat16", "--enforce-eager",
                     "--max-model-len", "4096") as srv:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == [smollm2]

        completion = client.completions.create(
            model=smollm2, prompt=CAPITAL, temperature=0, max_tokens=MATCH_TOKENS)
        choice = completion.choices[0]
        assert choice.text == smollm2_tokenizer.decode(hf_greedy[:MATCH_TOKENS])
        assert choice.finish_reason in ("length", "stop")
        assert completion.usage.completion_tokens <= MATCH_TOKENS

        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(
            model=smollm2, messages=messages, temperature=0, max_tokens=32)
        reply = chat.choices[0].message
        assert reply.role == "assistant" and reply.content.strip()
        assert chat.choices[0].finish_reason in ("length", "stop")
        # The chat template wraps the message: more prompt tokens than the bare question.
        bare = len(smollm2_tokenizer.encode(messages[0]["content"], add_special_tokens=False))
        assert chat.usage.prompt_tokens > bare + 3

        deltas, finish = [], None
        stream = client.chat.completions.create(
            model=smollm2, messages=messages, temperature=0, max_tokens=32, stream=True)
        for chunk in stream:
            for c in chunk.choices:
                if c.delta.content:
                    deltas.append(c.delta.content)
                finish = c.finish_reason or finish
        streamed = "".join(deltas)
        assert len(deltas) > 1 and streamed.strip()
        assert finish in ("length", "stop")
        assert streamed == reply.content  # greedy: streaming gives the same text
    log = srv.log_text()
    assert "POST /v1/chat/completions" in log
    assert srv.stop_seconds is not None and srv.stop_seconds < 30
    assert srv.process.returncode == 0, f"vllm serve exited {srv.process.returncode} on SIGINT"


def test_offline_greedy_matches_transformers(llm, hf_greedy, smollm2_tokenizer):
    from vllm import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [o.prompt for o in outputs] == PROMPTS
    for out in outputs:
        completion = out.outputs[0]
        assert completion.text.strip(), f"empty completion for {out.prompt!r}"
        assert 0 < len(completion.token_ids) <= MAX_TOKENS
        assert smollm2_tokenizer.decode(completion.token_ids) == completion.text

    capital = list(outputs[0].outputs[0].token_ids)
    assert capital[:MATCH_TOKENS] == hf_greedy[:MATCH_TOKENS], (
        f"vLLM {smollm2_tokenizer.decode(capital)!r} vs "
        f"transformers {smollm2_tokenizer.decode(hf_greedy)!r}")
    # Greedy decoding is deterministic: the same request again gives the same tokens.
    again = llm.generate([CAPITAL], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert list(again[0].outputs[0].token_ids) == capital
