"""Service and therapist commands: ``serve``, ``status``, ``therapist ...``, ``trust ...``."""

from __future__ import annotations

from devicebridge.cli.base import main


@main.group("therapist")
def therapist_group() -> None:
    """For therapists: signing keys and adherence of their clients' bridges."""


@main.group("trust")
def trust_group() -> None:
    """Therapist keys this bridge accepts signed programs from."""
