"""The same seed gives the same run, event for event and byte for byte; a fleet runs fast."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import pytest

from devicebridge.qa import run_scenario
from devicebridge.qa import scenario as scenario_module
from devicebridge.qa.bridge import QaBridge
from simulators.scenario.spec import load_scenario, parse_scenario
from tests.qa.conftest import SCENARIOS, scenario_text

MIXED = """
[[faults]]
kind = "drop"
rate = 0.05
burst = 2

[[faults]]
kind = "corrupt"
rate = 0.03

[[faults]]
kind = "disconnect"
at_s = 8
out_of_range_s = 1.5

[[faults]]
kind = "noise"
sigma = 0.3
"""


async def fingerprint(seed: int, tmp_path: Path) -> tuple[str, dict[str, str | None]]:
    scenario = parse_scenario(scenario_text(MIXED, duration_s=40))
    result = await run_scenario(
        scenario, seed=seed, workdir=tmp_path / f"run-{seed}-{id(object())}"
    )
    assert result.passed, result.verdict()
    digests = {label: o.telemetry_sha256 for label, o in result.devices.items()}
    return result.timeline_jsonl(), digests


async def test_same_seed_same_run_event_for_event(tmp_path: Path) -> None:
    first = await fingerprint(5, tmp_path)
    second = await fingerprint(5, tmp_path)
    difference = "\n".join(
        list(difflib.unified_diff(first[0].splitlines(), second[0].splitlines(), lineterm=""))[:30]
    )
    assert first[0] == second[0], difference
    assert first[1] == second[1]
    assert first[1]["m"] is not None
    assert first[0].count("\n") > 20  # a real timeline: faults, events, decisions


async def test_different_seeds_differ(tmp_path: Path) -> None:
    first = await fingerprint(5, tmp_path)
    other = await fingerprint(6, tmp_path)
    assert first[0] != other[0]
    assert first[1] != other[1]


async def test_fifty_devices_with_mixed_faults_on_the_virtual_clock(tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIOS / "fleet_50_mixed_faults.toml")
    result = await run_scenario(scenario, workdir=tmp_path)
    assert result.passed, result.verdict()
    assert len(result.devices) == 50
    kinds = {e.what for e in result.timeline if e.source == "fault"}
    assert {"drop", "corrupt", "disconnect", "stuck_sensor", "reboot"} <= kinds
    # The whole scenario ran on the virtual clock (how fast against the wall clock is
    # bench virtual_time's business, not a functional test's).
    assert result.virtual_s >= scenario.duration_s


@pytest.mark.parametrize("with_routine", [True, False])
async def test_the_store_helpers_start_before_the_bridge_connects_when_runs_will_store(
    monkeypatch: pytest.MonkeyPatch, with_routine: bool
) -> None:
    # The first run's record waits for the store writer's process: started before the
    # devices are built and connected, it is up sooner. A scenario with no routine stores
    # nothing and starts no process.
    order: list[str] = []
    start = scenario_module.start_store_writer
    connect = QaBridge.connect

    def started() -> None:
        order.append("store helpers")
        start()

    async def connecting(bridge: QaBridge, *args: Any, **kwargs: Any) -> Any:
        order.append("connect")
        return await connect(bridge, *args, **kwargs)

    monkeypatch.setattr(scenario_module, "start_store_writer", started)
    monkeypatch.setattr(QaBridge, "connect", connecting)
    text = scenario_text(duration_s=5)
    if not with_routine:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("routine"))
    result = await run_scenario(parse_scenario(text))
    assert result.failures == []
    assert order == (["store helpers", "connect"] if with_routine else ["connect"])
