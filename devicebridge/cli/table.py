"""Plain tables and field lists for the command line, without rich.

The light commands (``devices``, ``history``, ``routine list``, ``status``, ``trust
list``) print with these so that they start without importing rich (about 25 ms). A table
fits the terminal's width: the widest columns wrap inside their cells, word by word. When
stdout is not a terminal nothing wraps, so a script sees one row per line. Cells are
plain text: nothing in them is interpreted (names with square brackets print as they are).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Final

import click

COLUMN_GAP: Final = "  "
MIN_COLUMN_WIDTH: Final = 6


def terminal_width() -> int | None:
    """The terminal's width, or None when stdout is not a terminal (no wrapping)."""
    if not sys.stdout.isatty():
        return None
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except OSError:
        return None


class Table:
    """Rows under a header line, columns aligned; an optional title above."""

    def __init__(self, columns: Sequence[str], *, title: str | None = None) -> None:
        self.columns = list(columns)
        self.title = title
        self.rows: list[list[str]] = []

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([" ".join(cell.split("\n")) for cell in cells])

    def render(self, width: int | None = None) -> list[str]:
        """The lines of the table; ``width`` None never wraps."""
        widths = [
            max([len(column), *(len(row[i]) for row in self.rows)])
            for i, column in enumerate(self.columns)
        ]
        if width is not None:
            widths = _fit(widths, width - len(COLUMN_GAP) * (len(widths) - 1))
        lines: list[str] = []
        if self.title:
            lines.append(click.style(self.title, bold=True))
        lines.extend(_row_lines(self.columns, widths, bold=True))
        lines.append(COLUMN_GAP.join("-" * w for w in widths))
        for row in self.rows:
            lines.extend(_row_lines(row, widths))
        return lines

    def echo(self) -> None:
        for line in self.render(terminal_width()):
            click.echo(line)


def _fit(widths: list[int], room: int) -> list[int]:
    """Narrow the widest columns until the row fits ``room`` characters (if it can)."""
    widths = list(widths)
    while sum(widths) > room:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= MIN_COLUMN_WIDTH:
            break
        widths[widest] -= 1
    return widths


def _row_lines(cells: Sequence[str], widths: Sequence[int], *, bold: bool = False) -> list[str]:
    wrapped = [_wrap(cell, w) for cell, w in zip(cells, widths, strict=True)]
    height = max(len(parts) for parts in wrapped)
    lines = []
    for index in range(height):
        parts = [
            (w_parts[index] if index < len(w_parts) else "").ljust(w)
            for w_parts, w in zip(wrapped, widths, strict=True)
        ]
        line = COLUMN_GAP.join(parts).rstrip()
        lines.append(click.style(line, bold=True) if bold else line)
    return lines


def _wrap(cell: str, width: int) -> list[str]:
    if len(cell) <= width:
        return [cell]
    import textwrap  # only for a cell that must wrap

    return textwrap.wrap(cell, width=width, break_long_words=True, break_on_hyphens=False) or [""]


def echo_fields(rows: Sequence[tuple[str, str]], *, title: str | None = None) -> None:
    """``label  value`` lines, labels aligned (a summary: no empty header row)."""
    if title:
        click.echo(click.style(title, bold=True))
    width = max((len(label) for label, _ in rows), default=0)
    for label, value in rows:
        click.echo(f"  {label.ljust(width)}  {value}".rstrip())
