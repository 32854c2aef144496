"""The one table writer of the reports (``eval``'s printed table, the pipeline summary, docs/RESULTS.md)."""

from __future__ import annotations

import math


def cell(value, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals (``nan`` as ``-``), ``None`` as ``-``, anything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list], digits: int = 3) -> str:
    """A Markdown table (GitHub style) of ``rows`` under ``header``; cells go through :func:`cell`.

    Raises:
        ValueError: a row whose length differs from the header's.
    """
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"table row {r!r} has {len(r)} cells for {len(header)} columns {header}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v, digits) for v in r) + " |" for r in rows]
    return "\n".join(lines)
