"""The one way duo-vllm replaces a vLLM attribute: once per process, around the original, undoable.

Every replacement is recorded, so that when a later patch cannot attach (a vLLM release moved its
target) :func:`undo_all` puts every earlier one back and vLLM runs exactly as shipped.
"""

from __future__ import annotations

from collections.abc import Callable

# Set on every wrapper, so applying a patch again (plugins load in every process, sometimes
# more than once) leaves the first wrapper in place.
MARK = "_duo_vllm_wrapped"

_ABSENT = object()
# (owner, attribute name, what the owner's own __dict__ held before: _ABSENT if inherited/absent)
_APPLIED: list[tuple[object, str, object]] = []


def set_attribute(owner, name: str, value) -> None:
    """``setattr(owner, name, value)``, remembered for :func:`undo_all`."""
    _APPLIED.append((owner, name, vars(owner).get(name, _ABSENT)))
    setattr(owner, name, value)


def wrap_function(owner, name: str, make_wrapper: Callable[[Callable], Callable], *, also=()) -> None:
    """Replace ``owner.<name>`` by ``make_wrapper(original)`` unless it is already ours.

    ``also`` lists other modules that imported the same function by name and must see the
    wrapper too; each must hold the same original, or the patch would miss a caller.
    """
    original = getattr(owner, name)
    if getattr(original, MARK, False):
        return
    for target in also:
        if getattr(target, name) is not original:
            raise AttributeError(f"{target.__name__}.{name} is not {_qualname(owner)}.{name}: "
                                 "vLLM no longer imports it by name there")
    wrapper = make_wrapper(original)
    setattr(wrapper, MARK, True)
    for target in (owner, *also):
        set_attribute(target, name, wrapper)


def undo_all() -> None:
    """Restore every attribute replaced in this process, newest first."""
    while _APPLIED:
        owner, name, before = _APPLIED.pop()
        if before is _ABSENT:
            try:
                delattr(owner, name)
            except AttributeError:
                pass
        else:
            setattr(owner, name, before)


def applied() -> list[tuple[object, str]]:
    """(owner, name) of every replacement in place, oldest first."""
    return [(owner, name) for owner, name, _ in _APPLIED]


def _qualname(owner) -> str:
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", repr(owner))
