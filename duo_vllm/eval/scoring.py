"""Scoring: the share of the expected answers that appear in the output, as RULER scores its tasks
(``string_match_all``), with one difference: an answer counts only as a whole word or number, so
``1234567`` is not found inside ``91234567``. Case is ignored. A sample scores 0-100."""

from __future__ import annotations

import re
from collections.abc import Sequence


def found(answer: str, output: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", output, flags=re.IGNORECASE) is not None


def score(answers: Sequence[str], output: str) -> float:
    """Points (0-100) for ``output``: 100 x the fraction of ``answers`` it contains."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    return 100.0 * sum(found(a, output) for a in answers) / len(answers)
