"""The benchmark scripts' folder on sys.path, as when a script runs (``python benchmarks/X.py``):
their shared modules (``_common``, ``_plots``) import by their plain names."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
