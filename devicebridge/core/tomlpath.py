"""Problems found in TOML files, with the place in the file they refer to.

``tomllib`` gives no positions, so :func:`locate` finds the line of a key path such
as ``steps[3].pressure_kpa`` by scanning the text for the table headers and keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
