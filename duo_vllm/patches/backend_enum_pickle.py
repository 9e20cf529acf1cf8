"""Let the runtime-registered ``AttentionBackendEnum.DUO`` member survive pickling.

Why: ``register_backend("DUO", ...)`` adds an enum member at run time. Enum members pickle by
value, and a process started with ``spawn`` (``VLLM_WORKER_MULTIPROC_METHOD=spawn``, CUDA already
initialised, Ray) unpickles the ``VllmConfig`` *before* it loads plugins, so the member is unknown
there and start-up fails with "... is not a valid AttentionBackendEnum".
How: the DUO member reduces to a call of :func:`resolve_duo_backend`, which imports this package
(registering DUO) and returns the member. Only the DUO member is touched.
Remove when vLLM loads general plugins before unpickling the config in spawned processes.
"""

from __future__ import annotations


def resolve_duo_backend():
    from duo_vllm import BACKEND_NAME, register

    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[BACKEND_NAME]


def _reduce_duo(protocol):  # pickle's __reduce_ex__ signature
    return (resolve_duo_backend, ())


def apply() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from duo_vllm import BACKEND_NAME
    from duo_vllm.patches.wrapping import set_attribute

    member = AttentionBackendEnum[BACKEND_NAME]
    if vars(member).get("__reduce_ex__") is _reduce_duo:
        return
    # Instance attributes win over the Enum class's __reduce_ex__ in pickle's lookup.
    set_attribute(member, "__reduce_ex__", _reduce_duo)
