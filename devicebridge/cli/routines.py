"""Routine commands: ``routine ...``, ``run``, ``history`` and ``report``.
"""

from __future__ import annotations

from devicebridge.cli.base import main


@main.group("routine")
def routine_group() -> None:
    """Routine files: check, list, sign and push them."""
