"""Plain-text and Markdown tables for the commands' reports (one formatter for all of them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def align(
    rows: Sequence[Sequence[str]], right: Callable[[int], bool] | int = 1, widths: Sequence[int] | None = None
) -> list[str]:
    """Columns padded to a common width and joined by two spaces, trailing blanks removed.

    ``right``: which columns are right-aligned (numbers), as a predicate on the column index, or
    an int ``k`` meaning every column from index ``k`` on (the first ``k`` hold names).
    ``widths``: the column widths, when they must be known before all rows are (streamed output).
    """
    is_right = right if callable(right) else (lambda i, k=right: i >= k)
    widths = widths or [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if is_right(i) else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def markdown(rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table; the first row is the header."""
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def with_rule(rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """``rows`` with a line of dashes under the header, as wide as each column."""
    header, *body = rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [list(header), ["-" * w for w in widths], *map(list, body)]


def metric(value: float | None, digits: int = 4) -> str:
    """A metric for a table: fixed digits, or ``n/a`` where it is undefined (e.g. AUC of one class)."""
    return "n/a" if value is None else f"{value:.{digits}f}"
