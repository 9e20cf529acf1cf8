"""Environment every vLLM engine in the tests needs on our CPU machines (single source of truth).

``vllm serve`` subprocesses (tests/helpers/server.py) and in-process ``vllm.LLM`` engines both take
their defaults from :func:`vllm_env_defaults`. Without ``VLLM_CPU_KVCACHE_SPACE`` the CPU worker
reserves a KV cache sized for a big machine, and without ``VLLM_HOST_IP`` start-up can hang looking
for a routable interface.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def vllm_env_defaults(cache_root: str | None = None) -> dict[str, str]:
    """The environment defaults for a vLLM engine in tests.

    ``VLLM_CACHE_ROOT`` is ``cache_root`` when given, else a fresh temporary folder (the caller owns
    it), so compile caches of one test run never leak into another.
    """
    if cache_root is None:
        cache_root = tempfile.mkdtemp(prefix="duo-vllm-cache-")
    return {
        "VLLM_HOST_IP": "127.0.0.1",
        # GiB of CPU memory for the KV cache; the default is far too big for a 2-core CI box.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # No model hub is reachable: never try it.
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": cache_root,
        "TOKENIZERS_PARALLELISM": "false",
        # Usage reporting would only time out against the network.
        "VLLM_NO_USAGE_STATS": "1",
    }


def apply_vllm_env() -> dict[str, str]:
    """Put the defaults into ``os.environ`` without overriding what is already set.

    Returns the values in effect afterwards. A fresh ``VLLM_CACHE_ROOT`` (made only when the
    environment has none) is removed when the interpreter exits.
    """
    if "VLLM_CACHE_ROOT" in os.environ:
        defaults = vllm_env_defaults(os.environ["VLLM_CACHE_ROOT"])
    else:
        defaults = vllm_env_defaults()
        atexit.register(shutil.rmtree, defaults["VLLM_CACHE_ROOT"], ignore_errors=True)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in defaults}
