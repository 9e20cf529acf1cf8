"""What a run shows: mean scores per task and backend, the needle's depth x length grid per backend
(PNG heatmaps side by side), a task x backend table (PNG) and a one-screen text summary."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def scores(records: list[dict]) -> dict[str, dict[str, float]]:
    """backend -> task -> mean score over every length and sample."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        out[r["backend"]][r["task"]].append(r["score"])
    return {b: {t: mean(v) for t, v in tasks.items()} for b, tasks in out.items()}


def scores_by_length(records: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """backend -> task -> length -> mean score."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        out[r["backend"]][r["task"]][r["length"]].append(r["score"])
    return {b: {t: {n: mean(v) for n, v in sorted(ls.items())} for t, ls in ts.items()} for b, ts in out.items()}


def needle_grid(records: list[dict], backend: str) -> tuple[list[float], list[int], list[list[float]]]:
    """Depths, lengths and the mean needle score at each (depth, length)."""
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for r in records:
        if r["backend"] == backend and r["task"] == "needle":
            cells[(round(r["depth"], 4), r["length"])].append(r["score"])
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    grid = [[mean(cells.get((d, n), [])) for n in lengths] for d in depths]
    return depths, lengths, grid


def summary(records: list[dict], backends: list[str], tasks: list[str]) -> str:
    table = scores(records)
    by_length = scores_by_length(records)
    width = max(10, *(len(b) for b in backends))
    lines = ["mean score (0-100) per task, over lengths and samples:",
             f"{'task':<12}" + "".join(f"{b:>{width + 2}}" for b in backends)]
    for t in tasks:
        row = [table.get(b, {}).get(t) for b in backends]
        lines.append(f"{t:<12}" + "".join(f"{'-' if v is None else format(v, '.1f'):>{width + 2}}" for v in row))
    lengths = sorted({r["length"] for r in records if r["task"] != "control"})
    if lengths:
        lines.append("")
        lines.append("by length (tasks other than control averaged):")
        lines.append(f"{'length':<12}" + "".join(f"{b:>{width + 2}}" for b in backends))
        for n in lengths:
            vals = []
            for b in backends:
                per_task = [ls[n] for t, ls in by_length.get(b, {}).items() if t != "control" and n in ls]
                vals.append(mean(per_task) if per_task else None)
            lines.append(f"{n:<12}" + "".join(f"{'-' if v is None else format(v, '.1f'):>{width + 2}}" for v in vals))
    return "\n".join(lines)


def plot(records: list[dict], backends: list[str], tasks: list[str], out: Path, title: str) -> list[Path]:
    """The needle heatmaps (when the needle task ran) and the task x backend table; PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    with_needle = [b for b in backends if any(r["backend"] == b and r["task"] == "needle" for r in records)]
    if with_needle:
        fig, axes = plt.subplots(1, len(with_needle), figsize=(3.6 * len(with_needle) + 1, 3.6), squeeze=False)
        image = None
        for ax, b in zip(axes[0], with_needle):
            depths, lengths, grid = needle_grid(records, b)
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
            ax.set_xticks(range(len(lengths)), [_short_length(n) for n in lengths],
                          fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_xlabel("prompt tokens", fontsize=8)
            ax.set_title(f"{b}: {mean(v for row in grid for v in row):.1f}", fontsize=9)
        axes[0][0].set_ylabel("needle depth", fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score")
        fig.suptitle(f"needle: {title}", fontsize=9)
        path = out / "needle_heatmaps.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    table = scores(records)
    present = [t for t in tasks if any(t in table.get(b, {}) for b in backends)]
    grid = [[table.get(b, {}).get(t, float("nan")) for b in backends] for t in present]
    fig, ax = plt.subplots(figsize=(1.3 * len(backends) + 2, 0.45 * len(present) + 1.4))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v != v else f"{v:.1f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(backends)), backends, fontsize=8)
    ax.set_yticks(range(len(present)), present, fontsize=8)
    ax.set_title(f"mean score per task: {title}", fontsize=9)
    path = out / "task_scores.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    return written


def _short_length(n: int) -> str:
    """4096 -> 4K and 4000 -> 4K (whichever unit the length was given in), 1536 -> 1.5K, 512 -> 512."""
    if n < 1000:
        return str(n)
    for unit in (1024, 1000):
        if n % unit == 0:
            return f"{n // unit}K"
    return f"{n / 1000:.1f}".rstrip("0").rstrip(".") + "K"
