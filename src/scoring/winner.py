"""Which recipe won: the one rule that the report and `recipe-run export --recipe best` both apply.

Torch-free: the launcher's report imports it.
"""

from __future__ import annotations

from collections.abc import Iterable

HEADLINE = "f1"  # the report's winner is by F1 at IoU 0.5


def best(scored: Iterable[tuple[str, float]]) -> str | None:
    """The name with the highest value; ties go to the first (launch order); None when there is none.
    Only succeeded runs with a value are given here."""
    ranked = list(scored)
    return max(ranked, key=lambda pair: pair[1])[0] if ranked else None  # max keeps the first of equals
