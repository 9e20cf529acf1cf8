"""Plot helpers the benchmark scripts share: matplotlib set up headless, each backend's label and
colour, the short black marks drawn over bars (floors, wall times), and the PNG saved next to its
JSON. Each script keeps its own figure.

matplotlib is imported on first use, not here: the GPU machines have none (``pip install
'.[bench]'`` where the PNGs are drawn), and the scripts import this module there too.
"""

from __future__ import annotations

from pathlib import Path

BACKEND_LABELS = {"stock": "stock FLASH_ATTN", "duo": "DUO"}
BACKEND_COLOURS = {"stock": "C0", "duo": "C1", "duo-gather": "C2", "duo-overlap": "C3"}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(*args, **kwargs):
    """``pyplot().subplots(...)``: (figure, axes)."""
    return pyplot().subplots(*args, **kwargs)


def backend_label(backend: str) -> str:
    """How a figure names an engine: ``stock FLASH_ATTN``, ``DUO``, else the --backends name."""
    return BACKEND_LABELS.get(backend, backend)


def backend_colour(backend: str) -> str:
    """One colour per engine across every figure (stock C0, DUO C1, its variants after)."""
    return BACKEND_COLOURS.get(backend, "C4")


def marks(ax, xs, values, size: float, label: str | None = None) -> None:
    """Short black horizontal marks at ``values`` over bars at ``xs`` (``size``: their width in
    points): a floor, or a time measured apart from the bars."""
    ax.plot(xs, values, "k_", markersize=size, label=label)


def save_png(fig, path, dpi: int = 110) -> Path:
    """Lay the figure out and write it as ``path`` with a ``.png`` suffix (next to its JSON)."""
    fig.tight_layout()
    png = Path(path).with_suffix(".png")
    fig.savefig(png, dpi=dpi)
    pyplot().close(fig)
    return png
