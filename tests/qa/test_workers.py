"""A fleet shared out over worker processes: the same verdict, outcomes and timeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from devicebridge.qa import run_scenario
from devicebridge.qa.cli import scenario_group
from devicebridge.qa.scenario import ScenarioResult
from simulators.scenario.spec import load_scenario, parse_scenario
from tests.qa.conftest import SCENARIOS

# Devices that never meet each other's timing: each group streams and runs its routine
# with link and sensor faults of its own. Every device's run is the same whichever
# process it lands in.
INDEPENDENT = f"""
[scenario]
name = "independent fleet"
seed = 31
duration_s = 20
routine = "{SCENARIOS / "fleet_routine.toml"}"

[[devices]]
name = "clean"
count = 3

[[devices]]
name = "lossy"
count = 2

[[devices]]
name = "noisy"
count = 2

[[faults]]
device = "lossy"
kind = "drop"
rate = 0.05

[[faults]]
device = "noisy"
kind = "noise"
sigma = 0.4

[[expect]]
status = "completed"
"""


def fingerprint(result: ScenarioResult) -> tuple[str, str]:
    outcomes = {label: o.to_json() for label, o in result.devices.items()}
    return json.dumps(outcomes, sort_keys=True), result.timeline_jsonl()


async def test_a_sharded_run_equals_the_one_process_run(tmp_path: Path) -> None:
    scenario = parse_scenario(INDEPENDENT)
    alone = await run_scenario(scenario, workdir=tmp_path / "one")
    shared = await run_scenario(scenario, workdir=tmp_path / "three", workers=3)
    assert alone.passed, alone.verdict()
    assert shared.passed, shared.verdict()
    assert (alone.workers, shared.workers) == (1, 3)
    assert list(shared.devices) == scenario.labels()  # in the scenario's order
    assert fingerprint(shared) == fingerprint(alone)
    assert all(o.telemetry_sha256 for o in shared.devices.values())
    # The stores of every worker land in the one folder.
    assert len(list((tmp_path / "three").glob("*.sqlite3"))) == len(scenario.labels())


async def test_fifty_devices_on_two_workers_replay_exactly(tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIOS / "fleet_50_mixed_faults.toml")
    first = await run_scenario(scenario, workdir=tmp_path / "a", workers=2)
    second = await run_scenario(scenario, workdir=tmp_path / "b", workers=2)
    assert first.passed, first.verdict()
    assert len(first.devices) == 50
    assert fingerprint(first) == fingerprint(second)
    # The merged timeline is in time order, whichever worker each entry came from.
    times = [e.t_s for e in first.timeline]
    assert times == sorted(times)
    kinds = {e.what for e in first.timeline if e.source == "fault"}
    assert {"drop", "corrupt", "disconnect", "stuck_sensor", "reboot"} <= kinds


async def test_a_failing_sharded_run_names_its_workers_in_the_replay_line(
    tmp_path: Path,
) -> None:
    text = INDEPENDENT.replace('status = "completed"', 'status = "stopped"')
    result = await run_scenario(parse_scenario(text), workdir=tmp_path, workers=2)
    assert not result.passed
    assert len(result.failures) == 7  # every device, each named
    assert "--seed 31 --workers 2" in result.verdict()


async def test_workers_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        await run_scenario(parse_scenario(INDEPENDENT), workdir=tmp_path, workers=0)


def test_cli_runs_a_scenario_on_two_workers(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(INDEPENDENT, "utf-8")
    result = CliRunner().invoke(scenario_group, ["run", str(path), "--workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    # --json: stdout is one JSON document; the verdict goes to stderr.
    assert result.stderr.startswith("PASS independent fleet (seed 31): 7 device(s)")
    [payload] = json.loads(result.stdout)
    assert payload["workers"] == 2
    assert set(payload["devices"]) == {
        *(f"clean-{i}" for i in range(3)),
        *(f"lossy-{i}" for i in range(2)),
        *(f"noisy-{i}" for i in range(2)),
    }
