"""Examples: the bridge against simulated devices, with faults, on the virtual clock."""

from __future__ import annotations

from pathlib import Path

import pytest


async def test_routine_completes_on_a_clean_link(bridge, sim_massager, short_routine: Path) -> None:
    result = await bridge.run_routine(sim_massager, str(short_routine), max_duration_s=60)
    assert result.status == "completed"
    assert bridge.session(sim_massager).stats.lost_samples == 0


async def test_corrupted_frames_are_counted_and_dropped(
    bridge, sim_massager, sim_faults, short_routine: Path
) -> None:
    sim_faults(sim_massager, "corrupt", rate=0.05)
    result = await bridge.run_routine(sim_massager, str(short_routine), max_duration_s=60)
    stats = bridge.session(sim_massager).stats
    assert result.status == "completed"
    assert stats.malformed > 0
    assert stats.lost_samples == 0


async def test_stuck_sensor_pauses_with_a_clear_message(
    bridge, sim_massager, sim_faults, short_routine: Path
) -> None:
    sim_faults(sim_massager, "stuck_sensor", at_s=5)
    result = await bridge.run_routine(sim_massager, str(short_routine), max_duration_s=30)
    pauses = [d for d in result.decisions if d.reason == "sensor_stuck"]
    assert pauses
    assert "seems stuck" in pauses[0].message


@pytest.mark.sim_devices(massagers=3)
async def test_a_small_fleet_streams(bridge, sim_world) -> None:
    await bridge.clock.sleep(3.0)
    for device in sim_world.devices:
        assert bridge.session(device).stats.samples_delivered >= 250


async def test_a_scenario_file(sim_scenario) -> None:
    result = await sim_scenario(Path(__file__).parent / "scenarios" / "reboot.toml")
    assert result.passed, result.verdict()
