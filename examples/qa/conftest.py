"""Example QA suite against simulated devices (see docs/qa.md).

Nothing to set up here: the devicebridge pytest plugin provides ``sim_world``,
``sim_massager``, ``sim_mask``, ``sim_fleet``, ``sim_faults``, ``bridge`` and
``sim_scenario``, and collects ``scenario_*.toml`` files. Project-wide helpers go here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def short_routine() -> Path:
    return HERE / "scenarios" / "short_routine.toml"
