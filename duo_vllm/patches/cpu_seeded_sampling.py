"""Keep a seeded request alive on CPU when its sampled token is discarded (chunked prefill).

Why: when a request's prefill is split over several steps, vLLM still samples a token at the end
of every chunk and discards it. ``GPUModelRunner._bookkeeping_sync`` (0.32) then rewinds the
request's own ``torch.Generator`` with ``gen.set_offset(gen.get_offset() - 4)``, which relies on
CUDA's Philox generator. The CPU model runner inherits that code, but a CPU generator (Mersenne
Twister) has no offset: the first seeded request (OpenAI ``"seed": N``) whose prompt is longer
than one prefill chunk raises ``RuntimeError: CPU Generator does not use offset`` in the engine
core and the server dies for every client. Stock CPU_ATTN fails the same way: this is vLLM-CPU's
bug, fixed here for every CPU engine in a process where duo-vllm is installed.
How: wrap ``CPUModelRunner.sample_tokens`` (only the CPU runner: CUDA keeps vLLM's rewind). For
the step's discarded rows, the request's generator is taken out of ``input_batch.generators``
for that one call and put back after it. The discarded row is then sampled from the global
generator (vLLM throws the token away), the request's own generator is not drawn from, and
the rewind loop finds nothing to rewind. The request's random stream is then the one it would
have had without chunking, which is what the CUDA rewind also achieves. With the same seed and
prompt, the tokens are the same whether or not the prefill was chunked.
Remove when vLLM's CPU runner rewinds CPU generators itself (``set_offset`` gone from
``_bookkeeping_sync``): :func:`apply` checks that and stands aside.
"""

from __future__ import annotations

import inspect

from duo_vllm.patches.wrapping import wrap_function


def apply() -> None:
    from duo_vllm.vllm_support import platform_name

    if platform_name() != "cpu":
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if not _rewinds_by_offset(CPUModelRunner):
        return
    wrap_function(CPUModelRunner, "sample_tokens", _keep_discarded_generators)


def _rewinds_by_offset(runner_class) -> bool:
    """Whether this vLLM still rewinds discarded samples with the CUDA-only ``set_offset``."""
    try:
        return "set_offset" in inspect.getsource(runner_class._bookkeeping_sync)
    except (AttributeError, OSError, TypeError):  # no such method, or no source to read
        return False


def _keep_discarded_generators(original):
    def sample_tokens(self, *args, **kwargs):
        held = discarded_generators(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.input_batch.generators.update(held)

    return sample_tokens


def discarded_generators(runner) -> dict:
    """Take out of ``runner.input_batch.generators`` those of this step's rows whose sampled
    token vLLM will discard (a prefill chunk that is not the last), and return them."""
    generators = runner.input_batch.generators
    if not generators or getattr(runner, "execute_model_state", None) is None:
        return {}
    num_reqs = runner.input_batch.num_reqs
    discard = runner.discard_request_mask.np[:num_reqs]
    return {i: generators.pop(i) for i in [i for i in generators if i < num_reqs and discard[i]]}
