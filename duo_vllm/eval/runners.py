"""Where the prompts go: an offline ``vllm.LLM`` (one per backend, its memory returned before the
next starts) or a running OpenAI-compatible server, asked through the official ``openai`` client.
Both get token ids (exact lengths) and answer greedily."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from duo_vllm.eval.tasks import Sample

logger = logging.getLogger(__name__)


class EvalSetupError(ValueError):
    """Something to fix before any engine starts (unreachable server, bad model path, ...)."""


class OfflineRunner:
    """One ``vllm.LLM`` for one backend."""

    def __init__(self, model: str, engine_kwargs: dict, *, max_model_len: int, seed: int = 0):
        from vllm import LLM

        kwargs = {"model": model, "max_model_len": max_model_len, "seed": seed, **engine_kwargs}
        logger.info("starting vLLM: %s", kwargs)
        self.llm = LLM(**kwargs)

    def generate(self, samples: Sequence[Sample]) -> list[str]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=s.ids) for s in samples]
        params = [SamplingParams(temperature=0.0, max_tokens=s.max_tokens) for s in samples]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def close(self) -> None:
        """Stop the engine and give its memory back (vLLM 0.32's LLM has no shutdown(); its
        engine-core client does)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown(timeout=30)
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def connect(base_url: str, timeout: float = 10.0):
    """An ``openai`` client for ``base_url`` and the model it serves; fails at once when the server
    cannot be reached or serves nothing."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                           max_retries=0, timeout=timeout)
    try:
        models = client.models.list().data
    except openai.APIError as exc:
        raise EvalSetupError(
            f"cannot reach an OpenAI-compatible server at {base_url} ({type(exc).__name__}: {exc}); start one "
            "(`vllm serve MODEL --attention-backend DUO`) or fix --server (it ends in /v1)") from None
    if not models:
        raise EvalSetupError(f"the server at {base_url} serves no model")
    return client, models[0].id


class ServerRunner:
    """Any OpenAI-compatible completions endpoint that takes token-id prompts (vLLM's does)."""

    def __init__(self, base_url: str, *, concurrency: int = 8, request_timeout: float = 3600.0):
        self.client, self.model = connect(base_url)
        self.client = self.client.with_options(timeout=request_timeout)
        self.concurrency = concurrency

    def _one(self, sample: Sample) -> str:
        import openai

        try:
            response = self.client.completions.create(model=self.model, prompt=sample.ids,
                                                      max_tokens=sample.max_tokens, temperature=0.0)
        except openai.APIStatusError as exc:
            raise EvalSetupError(
                f"the server refused a {sample.prompt_tokens}-token {sample.task} prompt (HTTP {exc.status_code}: "
                f"{exc.message}); serve with a --max-model-len of at least {sample.prompt_tokens + sample.max_tokens} "
                "or pass shorter --lengths (cells already scored are kept)") from None
        except openai.APIError as exc:
            raise EvalSetupError(f"the server at {self.client.base_url} stopped answering ({type(exc).__name__}: "
                                 f"{exc}); cells already scored are kept, run again to resume") from None
        return response.choices[0].text

    def generate(self, samples: Sequence[Sample]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, samples))

    def close(self) -> None:
        self.client.close()
