"""The attach check's findings: one line per check as it runs, and the closing table
(``scripts/check_vllm_attach.py``; shared by its planner steps, ``vllm_attach_planner.py``)."""

from __future__ import annotations

from types import ModuleType

ROWS: list[tuple[str, str, str]] = []  # (step, check, result) for the closing table
FAILED: list[str] = []  # checks of steps 2-4 and 7 that failed


def record(step: str, check: str, ok: bool | None, detail: str = "", *, gating: bool = True) -> None:
    """ok: True pass, False fail, None informational."""
    result = "ok" if ok else ("info" if ok is None else "FAIL")
    if ok is False and not gating:
        result = "warn"
    ROWS.append((step, check, f"{result}{': ' + detail if detail else ''}"))
    print(f"  [{result}] {check}{': ' + detail if detail else ''}")
    if ok is False and gating:
        FAILED.append(f"{step} {check}")


def header(text: str) -> None:
    print(f"\n== {text}")


def describe(owner) -> str:
    if isinstance(owner, ModuleType):
        return owner.__name__
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    if hasattr(owner, "name") and hasattr(type(owner), "__members__"):  # an Enum member
        return f"{type(owner).__name__}.{owner.name}"
    return repr(owner)


def shorten(text: str, width: int = 96) -> str:
    """The closing table's form of a check: vLLM's deep module paths abbreviated."""
    for long, short in (("vllm.model_executor.model_loader.", "model_loader."),
                        ("vllm.model_executor.layers.attention.attention.", "attention."),
                        ("vllm.model_executor.", "model_executor."), ("vllm.v1.", "v1.")):
        text = text.replace(long, short)
    return text if len(text) <= width else text[: width - 3] + "..."


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__
