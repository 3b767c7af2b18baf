"""Errors of the simulators, one tree::

    SimulatorError                 what a simulator refuses or a simulated device answers
    ├── FaultError                 a fault description is invalid (which fault, which key)
    ├── ScenarioError              a scenario file is invalid (every problem, with its place)
    ├── ImageCheckError            bytes that are not a valid MCUboot image
    └── SmpError                   an SMP request the simulated firmware answers with an error

The first three are also ValueErrors: they say a value given to the simulator is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence


class SimulatorError(Exception):
    """Something a simulator refuses, or a simulated device answers with an error."""


class FaultError(SimulatorError, ValueError):
    """A fault description is invalid; the message says which fault and which parameter."""


class ScenarioError(SimulatorError, ValueError):
    """A scenario file is invalid; ``problems`` lists every problem with its place."""

    def __init__(self, label: str, problems: Sequence[str]) -> None:
        self.label = label
        self.problems = list(problems)
        super().__init__("\n".join(f"{label}: {p}" for p in problems))


class ImageCheckError(SimulatorError, ValueError):
    """The bytes are not a valid MCUboot image (the device would not boot them)."""


class SmpError(SimulatorError):
    """A request the server answers with an error (``rc``, and the group for SMP v2)."""

    def __init__(self, rc: int, *, group: int | None = None) -> None:
        super().__init__(rc)
        self.rc = rc
        self.group = group
