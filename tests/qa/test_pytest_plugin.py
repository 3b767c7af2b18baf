"""The pytest plugin, tested with pytest's own pytester: fixtures, --sim-seed, artifacts."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.qa.conftest import SHORT_ROUTINE

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""

TESTS = """
import pytest


@pytest.mark.sim_devices(massagers=1)
async def test_streams_through_the_bridge(bridge, sim_world, sim_faults):
    device = sim_world.devices[0]
    sim_faults(device, "duplicate", rate=0.2)
    session = bridge.session(device)
    await bridge.clock.sleep(6.0)
    assert session.stats.samples_delivered > 450
    assert session.stats.duplicates >= 1
    assert session.stats.lost_samples == 0


async def test_runs_a_routine(bridge, sim_massager):
    result = await bridge.run_routine(sim_massager, ROUTINE, max_duration_s=60)
    assert result.status == "completed"


def test_seed_fixture(sim_seed):
    print(f"SEED-IN-TEST {sim_seed}")


async def test_fleet(sim_fleet, bridge):
    devices = sim_fleet(3)
    await bridge.connect(devices)
    await bridge.clock.sleep(1.0)
    assert all(bridge.session(d).stats.samples_delivered > 0 for d in devices)


@pytest.mark.sim_devices(massagers=1)
async def test_fails_on_purpose(bridge, sim_world):
    await bridge.clock.sleep(1.0)
    assert False, "failing on purpose"
""".replace("ROUTINE", repr(str(SHORT_ROUTINE)))


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(INI)
    pytester.makepyfile(test_suite=TESTS)
    return pytester


def test_fixtures_seed_line_and_artifacts_of_a_failure(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--sim-seed=4242", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["devicebridge-sim: --sim-seed=4242 *"])
    result.stdout.fnmatch_lines(["*SEED-IN-TEST 4242*"])
    # The seed is printed in the header and again at the end of the run.
    assert "devicebridge-sim: --sim-seed=4242" in result.stdout.lines
    folders = list((suite.path / "sim-artifacts").iterdir())
    assert [f.name for f in folders] == ["test_suite.py_test_fails_on_purpose"]
    artifacts = folders[0]
    assert (artifacts / "seed.txt").read_text().strip() == "4242"
    timeline = (artifacts / "timeline.jsonl").read_text()
    assert '"what": "connected"' in timeline
    assert list((artifacts / "telemetry").glob("*.sqlite3")) == []  # no routine ran there


def test_a_fresh_seed_is_printed_when_none_is_given(suite: pytest.Pytester) -> None:
    result = suite.runpytest("-k", "seed_fixture", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    header = re.search(r"devicebridge-sim: --sim-seed=(\d+)", result.stdout.str())
    assert header is not None
    result.stdout.fnmatch_lines([f"*SEED-IN-TEST {header.group(1)}*"])


def test_scenario_files_are_collected_and_a_failure_leaves_its_artifacts(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(INI)
    shutil.copy(SHORT_ROUTINE, pytester.path / "short_routine.toml")
    scenario = """
[scenario]
name = "{name}"
seed = 3
duration_s = 40
routine = "short_routine.toml"

[[devices]]
name = "m"

[[expect]]
status = "{status}"
"""
    (pytester.path / "scenario_ok.toml").write_text(scenario.format(name="ok", status="completed"))
    (pytester.path / "scenario_bad.toml").write_text(scenario.format(name="bad", status="stopped"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*FAIL bad (seed 3)*", "*session status 'completed'*expected 'stopped'*"]
    )
    (folder,) = (pytester.path / "sim-artifacts").iterdir()
    assert {p.name for p in folder.iterdir()} >= {
        "seed.txt",
        "scenario.toml",
        "timeline.jsonl",
        "verdict.txt",
        "outcomes.json",
        "telemetry",
    }
    assert list((folder / "telemetry").glob("*.sqlite3"))


def test_the_plugin_is_registered_as_an_entry_point() -> None:
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="pytest11")}
    assert "devicebridge.qa.pytest_plugin" in names
    assert Path(__file__).exists()
