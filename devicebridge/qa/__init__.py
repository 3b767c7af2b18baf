"""QA tooling: run the bridge against simulated devices, with faults, from tests or the CLI.

- :class:`QaBridge`: the bridge's real parts connected to a simulated world;
- :func:`run_scenario`: a TOML scenario (devices, hand, faults, expectations) with a verdict;
- :func:`record_scenario`: a scenario that replays a stored session;
- the pytest plugin :mod:`devicebridge.qa.pytest_plugin` (registered as ``pytest11``).

Documented in ``docs/qa.md``.
"""

from devicebridge.errors import QaError
from devicebridge.qa.bridge import QaBridge, Timeline, TimelineEntry, load_routine
from devicebridge.qa.record import record_scenario
from devicebridge.qa.scenario import DeviceOutcome, ScenarioResult, run_scenario

__all__ = [
    "DeviceOutcome",
    "QaBridge",
    "QaError",
    "ScenarioResult",
    "Timeline",
    "TimelineEntry",
    "load_routine",
    "record_scenario",
    "run_scenario",
]
