"""The starter library: the routines shipped with devicebridge (package data), by name."""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable


def _folder() -> Traversable:
    return resources.files("devicebridge") / "data" / "routines"


def starter_routines() -> dict[str, str]:
    """Every starter routine: its name (the file stem, e.g. ``firming``) -> TOML text."""
    return {
        entry.name.removesuffix(".toml"): entry.read_text("utf-8")
        for entry in sorted(_folder().iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".toml")
    }


def starter_text(name: str) -> str | None:
    """The TOML text of starter routine ``name``, or None when there is none."""
    entry = _folder() / f"{name}.toml"
    return entry.read_text("utf-8") if entry.is_file() else None
