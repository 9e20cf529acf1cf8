"""The one way duo-vllm replaces a vLLM function: once per process, around the original."""

from __future__ import annotations

from collections.abc import Callable

# Set on every wrapper, so applying a patch again (plugins load in every process, sometimes
# more than once) leaves the first wrapper in place.
MARK = "_duo_vllm_wrapped"


def wrap_function(owner, name: str, make_wrapper: Callable[[Callable], Callable], *, also=()) -> None:
    """Replace ``owner.<name>`` by ``make_wrapper(original)`` unless it is already ours.

    ``also`` lists other modules that imported the same function by name and must see the
    wrapper too.
    """
    original = getattr(owner, name)
    if getattr(original, MARK, False):
        return
    wrapper = make_wrapper(original)
    setattr(wrapper, MARK, True)
    for target in (owner, *also):
        setattr(target, name, wrapper)
