"""How much faster than real time a 15-minute routine runs on the virtual clock.

Every row is the whole bridge against simulated massagers (100 Hz telemetry) on a fast
virtual clock: bleak over the simulator backend, sessions, the routine engine with its
fault checks, SQLite stores, commands back to the devices, hands that follow the bridge's
guidance. The baseline is real time (ratio 1).

- One device runs the whole 15-minute routine in one process.
- 100 devices run the whole 15-minute routine at once, shared out over one worker process
  per core (``run_scenario(workers=...)``, ``devicebridge-sim scenario run --workers``),
  with devices that notify once a second (the scenario option ``batch_interval_s``):
  the bridge's and the simulator's cost is mostly per notification, and 100 devices x 10
  notifications a second at 100 x real time would leave 10 us per notification for the
  device, the link, the session, the engine and the store.
- The same fleet with the devices' default 100 ms notifications runs the routine's first
  ``FLEET_WINDOW_S`` (the rate is steady: every device costs the same per virtual second
  all through the routine), on one process and on one per core, to show where that bound
  sits.
- Streaming only (no routine) shows the share of the routine engine and the store.

Targets (issue 5): at least 1000 x real time for one device, 100 x for 100 devices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Final

from bench.report import print_table
from devicebridge.qa import run_scenario
from simulators.scenario.spec import parse_scenario

ROUTINE_S: Final = 15 * 60
FLEET: Final = 100
FLEET_WINDOW_S: Final = 60.0
TARGET_ONE: Final = 1000.0
TARGET_FLEET: Final = 100.0
ZONES: Final = ("cheek_left", "cheek_right", "jawline_left", "jawline_right", "chin")
STEP_S: Final = 50  # under the 60 s pass cap, so that a clean run never pauses
FLEET_INTERVAL_S: Final = 1.0  # a fleet whose devices notify once a second (scenario option)
CORES: Final = os.cpu_count() or 1


def routine_text() -> str:
    steps = []
    for index in range(ROUTINE_S // STEP_S):
        steps.append(
            f"""
[[steps]]
zone = "{ZONES[index % len(ZONES)]}"
contact_time_s = {STEP_S}
mode = "vibration"
intensity = 4
pressure_kpa = {{ min = 6.0, max = 12.0 }}
"""
        )
    head = """[routine]
name = "bench: 15 minutes"
author = "bench"
version = "1"
device_kind = "massager"
category = "relaxation"
rationale = "A long clean routine for timing."
"""
    return head + "".join(steps)


def scenario(
    devices: int, duration_s: float, with_routine: bool, batch_interval_s: float | None = None
) -> str:
    routine = f"routine_text = {json.dumps(routine_text())}" if with_routine else ""
    interval = "" if batch_interval_s is None else f"batch_interval_s = {batch_interval_s}"
    return f"""
[scenario]
name = "bench {devices}"
seed = 1
duration_s = {duration_s}
{routine}

[[devices]]
name = "m"
count = {devices}
{interval}
"""


def measure(
    devices: int,
    duration_s: float,
    with_routine: bool,
    batch_interval_s: float | None = None,
    workers: int = 1,
) -> tuple[float, float, str]:
    parsed = parse_scenario(scenario(devices, duration_s, with_routine, batch_interval_s))
    with tempfile.TemporaryDirectory(prefix="bench-virtual-") as tmp:
        started = time.perf_counter()
        result = asyncio.run(run_scenario(parsed, workdir=Path(tmp), workers=workers))
        wall_s = time.perf_counter() - started
    statuses = {o.run.status for o in result.devices.values() if o.run is not None}
    return result.virtual_s, wall_s, ",".join(sorted(statuses)) or "streamed"


def run() -> bool:
    logging.disable(logging.WARNING)
    rows = []
    verdicts = []
    whole = ROUTINE_S + 30.0
    window = f"first {FLEET_WINDOW_S:g} s"
    cases: tuple[tuple[str, int, float, bool, float | None, int, float | None], ...] = (
        ("1 device, whole routine", 1, whole, True, None, 1, TARGET_ONE),
        (
            f"{FLEET} devices, whole routine, 1 s notifications",
            FLEET,
            whole,
            True,
            FLEET_INTERVAL_S,
            CORES,
            TARGET_FLEET,
        ),
        (
            f"{FLEET} devices, whole routine, 1 s notifications",
            FLEET,
            whole,
            True,
            FLEET_INTERVAL_S,
            1,
            None,
        ),
        (
            f"{FLEET} devices, {window}, 100 ms notifications",
            FLEET,
            FLEET_WINDOW_S,
            True,
            None,
            CORES,
            None,
        ),
        (
            f"{FLEET} devices, {window}, 100 ms notifications",
            FLEET,
            FLEET_WINDOW_S,
            True,
            None,
            1,
            None,
        ),
        ("1 device, streaming only", 1, ROUTINE_S, False, None, 1, None),
        (f"{FLEET} devices, {window}, streaming only", FLEET, FLEET_WINDOW_S, False, None, 1, None),
    )
    for label, devices, duration_s, with_routine, interval_s, workers, target in cases:
        virtual_s, wall_s, status = measure(devices, duration_s, with_routine, interval_s, workers)
        ratio = virtual_s / wall_s
        met = "" if target is None else ("met" if ratio >= target else "MISSED")
        if target is not None:
            verdicts.append(ratio >= target)
        rows.append(
            (
                label,
                workers,
                status,
                virtual_s,
                wall_s,
                ratio,
                "" if target is None else f"{target:g}",
                met,
            )
        )
    print_table(
        "Virtual time: a 15-minute routine through the whole bridge (baseline: real time = 1)",
        ("case", "processes", "session", "virtual s", "wall s", "x real time", "target", ""),
        rows,
    )
    return all(verdicts)
