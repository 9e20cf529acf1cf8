"""What ``--attention-backend DUO`` does where DUO stood aside: stop at start-up, saying why.

When :mod:`duo_vllm.vllm_support` finds a vLLM it cannot serve, the name DUO still resolves, to
:class:`DuoUnavailableBackend`, so that asking for it gives the reason and the fix instead of
vLLM's "Unknown attention backend" (or, on CPU, a silent fall-back to CPU_ATTN). The front-end
check raises as soon as the engine config exists; the backend class repeats the refusal
wherever vLLM would resolve it (an engine built from a ready ``VllmConfig``).
"""

from __future__ import annotations

UNAVAILABLE_CLASS_PATH = "duo_vllm.unavailable.DuoUnavailableBackend"


class DuoUnavailableError(ValueError):
    """DUO was asked for on a vLLM it does not serve."""


def _reason() -> str:
    from duo_vllm.vllm_support import stood_aside_reason

    return stood_aside_reason() or "duo-vllm stood aside in this process"


def refusal() -> DuoUnavailableError:
    return DuoUnavailableError(f"--attention-backend DUO is not available: {_reason()}")


def stand_in(register_backend) -> None:
    """Where DUO stood aside: the name DUO resolves to the refusing backend, and a config that
    selects it is refused in the front end."""
    register_backend(UNAVAILABLE_CLASS_PATH)
    refuse_in_front_end()


def refuse_in_front_end() -> None:
    """Make ``EngineArgs.create_engine_config`` refuse a config that selects DUO."""
    from duo_vllm.patches.engine_config_validation import when_duo_is_selected

    def refuse(config) -> None:
        raise refusal()

    when_duo_is_selected(refuse)


class DuoUnavailableBackend:
    """Stands in for the DUO backend; every use raises :func:`refusal`."""

    @staticmethod
    def get_name() -> str:
        raise refusal()

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        return [str(refusal())]

    @staticmethod
    def get_impl_cls():
        raise refusal()

    @staticmethod
    def get_builder_cls():
        raise refusal()
