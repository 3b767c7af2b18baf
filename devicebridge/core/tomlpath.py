"""Problems found in TOML files, with the place in the file they refer to.

``tomllib`` gives no positions, so :func:`locate` finds the line of a key path such
as ``steps[3].pressure_kpa`` by scanning the text for the table headers and keys.
:func:`number_problem` is the one check of a number read from a policy or routine file:
a real number (not a bool), finite, and in its documented range.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import TypeGuard

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")
_PATH_PART = re.compile(r"([^.\[\]]+)(?:\[(\d+)\])?")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a file: ``path`` like ``steps[3].pressure_kpa`` (1-based index)."""

    path: str
    message: str
    line: int | None = None
    rule: str | None = None  # the policy rule (and its source) that the value breaks

    def render(self, file_label: str) -> str:
        place = f"{file_label}:{self.line}" if self.line else file_label
        text = f"{place}: {self.path}: {self.message}"
        return f"{text} (policy: {self.rule})" if self.rule else text


def locate(text: str, path: str) -> int | None:
    """1-based line of ``path`` in TOML ``text``, or of its nearest enclosing table."""
    parts = [
        (m.group(1), int(m.group(2)) if m.group(2) else None) for m in _PATH_PART.finditer(path)
    ]
    if not parts:
        return None
    lines = text.splitlines()
    headers = [_header(line) for line in lines]
    for depth in range(len(parts), 0, -1):
        dotted = ".".join(name for name, _ in parts[:depth])
        found = [i for i, header in enumerate(headers) if header == dotted]
        if not found:
            continue
        index = parts[depth - 1][1]
        position = found[index - 1] if index and index <= len(found) else found[0]
        if depth == len(parts):
            return position + 1
        following = [i for i in range(position + 1, len(lines)) if headers[i] is not None]
        end = following[0] if following else len(lines)
        wanted = parts[depth][0]
        for i in range(position + 1, end):
            key = _KEY.match(lines[i])
            if key and key.group(1).strip("\"'") == wanted:
                return i + 1
        return position + 1
    # A top-level key (before the first table header).
    first_table = next((i for i, header in enumerate(headers) if header is not None), len(lines))
    for i in range(first_table):
        key = _KEY.match(lines[i])
        if key and key.group(1).strip("\"'") == parts[0][0]:
            return i + 1
    return None


def _header(line: str) -> str | None:
    match = _HEADER.match(line)
    if not match:
        return None
    return ".".join(part.strip().strip("\"'") for part in match.group(1).split("."))


# Integers longer than this are shown by their size: a message must stay readable.
_SHOWN_DIGITS = 15
_SHOWN_CHARS = 40


def show(value: object) -> str:
    """A TOML value as messages show it (never fails, whatever its size or type)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        digits = len(str(abs(value)))
        return str(value) if digits <= _SHOWN_DIGITS else f"an integer of {digits} digits"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return repr(value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "...")
    if value is None:
        return "nothing"
    kind = toml_type(value)
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def toml_type(value: object) -> str:
    """The TOML name of a parsed value's type (``table``, ``array``, ``boolean``...)."""
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (dict, "table"),
        (list, "array"),
        (datetime, "date-time"),
        (date, "date"),
        (time, "time"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def number_problem(
    value: object,
    low: float,
    high: float | None,
    *,
    whole: bool = False,
    above_low: bool = False,
) -> str | None:
    """What is wrong with ``value`` as a number in ``low..high`` (None: nothing).

    ``high=None``: no upper end (the caller compares with a limit of its own).
    ``whole``: a TOML integer is required. ``above_low``: ``low`` itself is excluded.
    Booleans, NaN and infinities are refused; a huge integer is compared exactly (never
    converted to a float first, which would overflow).
    """
    if whole:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number (an integer such as 7), got {show(value)}"
    elif isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {show(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {show(value)}"
    assert isinstance(value, int | float)
    too_low = value < low or (above_low and value == low)
    if too_low or (high is not None and value > high):
        lowest = f"above {low:g}" if above_low else f"at least {low:g}"
        if high is None:
            return f"must be {lowest}, got {show(value)}"
        lowest = f"above {low:g}" if above_low else f"from {low:g}"
        return f"must be {lowest} to {high:g}, got {show(value)}"
    return None


def is_real(value: object) -> TypeGuard[int | float]:
    """A finite int or float (not a bool): a value :func:`number_problem` may compare."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and (isinstance(value, int) or math.isfinite(value))
    )


def as_float(value: int | float) -> float | None:
    """``value`` as a float, or None for an integer too large for one."""
    try:
        return float(value)
    except OverflowError:
        return None
