"""Shared helpers of the QA tests: the short routine and scenario text builders."""

from __future__ import annotations

from pathlib import Path

SCENARIOS = Path(__file__).parent / "scenarios"
SHORT_ROUTINE = SCENARIOS / "short_routine.toml"


def scenario_text(
    body: str = "", *, seed: int = 11, duration_s: float = 60, name: str = "t"
) -> str:
    """A one-massager scenario running the short routine, plus ``body`` (faults, expect)."""
    return f"""
[scenario]
name = "{name}"
seed = {seed}
duration_s = {duration_s}
routine = "{SHORT_ROUTINE}"

[[devices]]
name = "m"
kind = "massager"

{body}
"""
