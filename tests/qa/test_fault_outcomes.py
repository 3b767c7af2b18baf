"""The bridge meets each fault and the outcome is what a user would want.

Each case is a scenario (one massager running a short routine) whose expectations state the
outcome: nothing lost and the routine completed for link and frame faults; a clear pause or
stop for firmware faults; an interrupted session record for reboots and empty batteries.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devicebridge.qa import run_scenario
from devicebridge.storage.sessions import SessionStore
from simulators.scenario.spec import parse_scenario
from tests.qa.conftest import scenario_text

COMPLETE_WITHOUT_LOSS = """
[[expect]]
status = "completed"
max_lost_samples = 0
stored_contiguous = true
forbid_decisions = [{ kind = "stop" }]
"""

CASES: dict[str, str] = {
    # ---- link
    "drop single": """
[[faults]]
kind = "drop"
rate = 0.05
"""
    + COMPLETE_WITHOUT_LOSS
    + "min_gaps = 1\n",
    "drop bursts": """
[[faults]]
kind = "drop"
rate = 0.03
burst = 5
"""
    + COMPLETE_WITHOUT_LOSS
    + "min_gaps = 1\n",
    "latency": """
[[faults]]
kind = "latency"
delay_s = 0.4
jitter_s = 0.2
"""
    + COMPLETE_WITHOUT_LOSS,
    "disconnects": """
[[faults]]
kind = "disconnect"
at_s = 6
every_s = 7
count = 2
out_of_range_s = 2.5
"""
    + COMPLETE_WITHOUT_LOSS
    + "min_reconnects = 2\n",
    "smaller MTU": """
[[faults]]
kind = "mtu"
mtu_size = 23
at_s = 5
duration_s = 5
"""
    + COMPLETE_WITHOUT_LOSS,
    # ---- frame
    "corrupted frames": """
[[faults]]
kind = "corrupt"
rate = 0.05
bits = 3
"""
    + COMPLETE_WITHOUT_LOSS
    + "min_malformed = 1\n",
    "truncated frames": """
[[faults]]
kind = "truncate"
rate = 0.05
"""
    + COMPLETE_WITHOUT_LOSS
    + "min_malformed = 1\n",
    "duplicated frames": """
[[faults]]
kind = "duplicate"
rate = 0.1
"""
    + COMPLETE_WITHOUT_LOSS
    + "min_duplicates = 1\n",
    "reordered frames": """
[[faults]]
kind = "reorder"
rate = 0.1
"""
    + COMPLETE_WITHOUT_LOSS,
    # ---- device
    "reboot": """
[[faults]]
kind = "reboot"
at_s = 10

[[expect]]
status = "interrupted"
end_reason = "device rebooted"
min_device_restarts = 1
stored_contiguous = true
""",
    "brown-out": """
[[faults]]
kind = "brownout"
at_s = 10

[[expect]]
status = "interrupted"
end_reason = "device rebooted"
min_stop_all = 1
""",
    "low battery and shutdown": """
[[faults]]
kind = "low_battery"
at_s = 5
percent = 8
empty_after_s = 4

[[expect]]
status = "interrupted"
end_reason = "device shut down"
events = ["BATTERY_LOW", "SHUTDOWN"]
stored_contiguous = true
""",
    "stuck pressure sensor": """
[[faults]]
kind = "stuck_sensor"
at_s = 6

[[expect]]
decisions = [{ kind = "pause", reason = "sensor_stuck", message = "seems stuck" }]
forbid_decisions = [{ kind = "complete" }]
min_stop_all = 1
""",
    "stuck sensor that recovers": """
[[faults]]
kind = "stuck_sensor"
at_s = 6
duration_s = 6

[[expect]]
status = "completed"
decisions = [
    { kind = "pause", reason = "sensor_stuck" },
    { kind = "resume", reason = "sensor_stuck" },
]
""",
    "clock drift": """
[[faults]]
kind = "clock_drift"
ppm = 30000

[[expect]]
status = "completed"
max_lost_samples = 0
clock_drift_ppm = [25000, 35000]
""",
    "command acknowledged but not applied": """
[[faults]]
kind = "ignore_commands"
opcodes = ["SET_INTENSITY"]

[[expect]]
status = "stopped"
end_reason = "command_not_applied"
decisions = [
    { kind = "stop", reason = "command_not_applied", message = "does not do what it is told" },
]
""",
    # ---- sensor
    "sensor noise": """
[[faults]]
kind = "noise"
sigma = 0.8

[[expect]]
status = "completed"
max_lost_samples = 0
""",
    "sensor drift": """
[[faults]]
kind = "drift"
per_s = 0.5
at_s = 4

[[expect]]
decisions = [{ kind = "warning", reason = "pressure_too_high" }]
""",
    "sensor saturation": """
[[faults]]
kind = "saturation"
max = 6.0

[[expect]]
decisions = [{ kind = "pause", reason = "sensor_stuck" }]
forbid_decisions = [{ kind = "complete" }]
""",
    "sensor dropout": """
[[faults]]
kind = "dropout"
at_s = 6
duration_s = 4

[[expect]]
status = "completed"
decisions = [{ kind = "pause", reason = "no_contact" }, { kind = "resume", reason = "no_contact" }]
""",
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bridge_meets_fault(case: str) -> None:
    scenario = parse_scenario(scenario_text(CASES[case], name=case, duration_s=45))
    result = await run_scenario(scenario)
    assert result.passed, result.verdict()
    faults_seen = [e for e in result.timeline if e.source == "fault"]
    assert faults_seen, "the fault never fired"


async def test_reboot_loses_no_sample_the_device_still_held(tmp_path: Path) -> None:
    # Notifications are lost just before the reboot, so the bridge holds live samples
    # behind a backfill when the device goes down; the firmware sends what it has first.
    text = scenario_text(
        """
[[faults]]
kind = "drop"
rate = 1.0
at_s = 9.5
duration_s = 0.4

[[faults]]
kind = "reboot"
at_s = 10
""",
        duration_s=30,
    )
    result = await run_scenario(parse_scenario(text), workdir=tmp_path)
    outcome = result.devices["m"]
    assert outcome.run is not None
    assert (outcome.run.status, outcome.run.end_reason) == ("interrupted", "device rebooted")
    reboot = [e for e in result.timeline if e.what == "reboot"]
    assert len(reboot) == 1
    next_sequence_at_reboot = int(reboot[0].detail.split()[-1])
    with SessionStore(tmp_path / "m.sqlite3") as store:
        (record,) = store.sessions()
        assert record.status == "interrupted"
        assert record.end_reason == "device rebooted"
        sequences, _ = store.telemetry(record.id)
    # Every sample from the session's first to the last one the device had taken is stored.
    first = int(sequences[0])
    assert sequences.tolist() == list(range(first, next_sequence_at_reboot))
    assert outcome.stats.gaps >= 1  # the dropped notifications were a gap, filled by backfill
    assert outcome.stats.lost_samples == 0
