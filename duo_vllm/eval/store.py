"""Results on disk, one JSON line per scored sample, so an interrupted run resumes cell by cell.

A cell is (backend, task, length, depth). ``run.json`` holds what makes prompts and answers
comparable (model, seed, chat template, DUO options, engine arguments); a folder holding another
run's results is refused rather than mixed into.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"


class StoreError(ValueError):
    """An output folder that holds another run's results."""


def cell_key(backend: str, task: str, length: int, depth: float | None) -> str:
    return f"{backend}|{task}|{length}|{'-' if depth is None else f'{depth:.4f}'}"


class ResultStore:
    def __init__(self, out: Path, identity: dict, *, fresh: bool = False):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.records_path = out / RECORDS_FILE
        run_path = out / RUN_FILE
        if fresh:
            self.records_path.unlink(missing_ok=True)
        elif run_path.exists() and self.records_path.exists():
            previous = json.loads(run_path.read_text())
            differ = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            if differ:
                raise StoreError(
                    f"{out} holds results of another run (it differs in {', '.join(differ)}); "
                    "use another --out, or --fresh to discard them")
        run_path.write_text(json.dumps(identity, indent=2, sort_keys=True, default=str))
        self.records: list[dict] = []
        self._done: dict[str, int] = defaultdict(int)
        if self.records_path.exists():
            for line in self.records_path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted write: that cell runs again
                self.records.append(record)
                self._done[record["cell"]] += 1

    def done(self, key: str, samples: int) -> bool:
        return self._done.get(key, 0) >= samples

    def add_cell(self, key: str, records: list[dict]) -> None:
        """Append a whole cell (a cell half written by a killed run is dropped and redone)."""
        for r in records:
            r["cell"] = key
        self.records += records
        self._done[key] = len(records)
        with self.records_path.open("a+b") as f:
            f.seek(0, 2)
            if f.tell():
                f.seek(-1, 2)
                if f.read(1) != b"\n":  # a line cut short by a kill: end it, it is skipped on reading
                    f.write(b"\n")
            f.write("".join(json.dumps(r) + "\n" for r in records).encode())
            f.flush()

    def final_records(self) -> list[dict]:
        """One record per (cell, sample index): the latest written."""
        by_cell: dict[str, dict[int, dict]] = {}
        for r in self.records:
            by_cell.setdefault(r["cell"], {})[r["index"]] = r
        return [r for cell in by_cell.values() for _, r in sorted(cell.items())]
