"""QA suites under pytest-xdist: several worker processes, each with its own seed.

Each worker's seed follows from the session's seed and its id, is printed per worker, and
is named in a failing test's report, so that the failure reproduces alone with
``--sim-seed``. The suites run in a subprocess, as a user runs them (``pytest -n 2``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from devicebridge.qa.pytest_plugin import worker_seed

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "qa"
WORKER_SEED = re.compile(r"^devicebridge-sim: \[(gw\d+)\] --sim-seed=(\d+)$")
SESSION_SEED = re.compile(r"^devicebridge-sim: --sim-seed=(\d+)$")
INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""
FLEET_DEVICES = 50
FLEET_SCENARIOS = 4


def worker_seeds(result: pytest.RunResult) -> dict[str, int]:
    """The worker seeds of the closing summary (each worker's is also printed as it starts)."""
    seeds: dict[str, list[int]] = {}
    for line in result.stdout.lines:
        found = WORKER_SEED.match(line)
        if found:
            seeds.setdefault(found.group(1), []).append(int(found.group(2)))
    # Printed twice each: as the worker came up and in the summary, the same seed.
    assert all(len(printed) == 2 and len(set(printed)) == 1 for printed in seeds.values())
    return {worker: printed[0] for worker, printed in seeds.items()}


def session_seed(result: pytest.RunResult) -> int:
    seeds = {int(m.group(1)) for line in result.stdout.lines if (m := SESSION_SEED.match(line))}
    assert len(seeds) == 1
    return seeds.pop()


def assert_two_workers_with_their_own_seeds(result: pytest.RunResult) -> dict[str, int]:
    seeds = worker_seeds(result)
    assert sorted(seeds) == ["gw0", "gw1"]
    assert seeds["gw0"] != seeds["gw1"]
    session = session_seed(result)
    assert seeds == {worker: worker_seed(session, worker) for worker in seeds}
    return seeds


def test_the_example_suite_passes_on_two_workers(pytester: pytest.Pytester) -> None:
    shutil.copytree(EXAMPLES, pytester.path, dirs_exist_ok=True)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    assert_two_workers_with_their_own_seeds(result)
    # The same session seed gives the workers the same seeds again.
    seed = session_seed(result)
    again = pytester.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", f"--sim-seed={seed}", "-k", "fleet or clean"
    )
    again.assert_outcomes(passed=2)
    assert worker_seeds(again) == worker_seeds(result)


def fleet_scenario(index: int) -> str:
    fault = '\n[[faults]]\nkind = "duplicate"\nrate = 0.02\n' if index % 2 else ""
    return f"""
[scenario]
name = "fleet {index}: {FLEET_DEVICES} massagers through a short routine"
seed = {100 + index}
duration_s = 30
routine = "short_routine.toml"

[[devices]]
name = "face"
kind = "massager"
count = {FLEET_DEVICES}
{fault}
[[expect]]
status = "completed"
max_lost_samples = 0
"""


def test_a_generated_fleet_scenario_suite_passes_on_two_workers(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(INI)
    shutil.copy(EXAMPLES / "scenarios" / "short_routine.toml", pytester.path)
    for index in range(FLEET_SCENARIOS):
        pytester.makefile(".toml", **{f"scenario_fleet_{index}": fleet_scenario(index)})
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=FLEET_SCENARIOS)
    assert_two_workers_with_their_own_seeds(result)


FAILING_SUITE = """
import hashlib

import pytest


@pytest.mark.parametrize("k", range(6))
async def test_streams(bridge, sim_massager, k):
    await bridge.clock.sleep(1.0)
    assert bridge.session(sim_massager).stats.samples_delivered > 50


async def test_fails_with_what_it_saw(bridge, sim_massager):
    await bridge.clock.sleep(2.0)
    samples = sim_massager.ring.range(0, 150)[1].tobytes()
    assert len(samples) > 0
    seen = hashlib.sha256(samples + sim_massager.serial_number.encode()).hexdigest()[:16]
    pytest.fail(f"SAW {seen}")
"""
REPRODUCE = re.compile(
    r"ran on xdist worker (gw\d+) with --sim-seed=(\d+); "
    r"alone: pytest '(\S+)' --sim-seed=(\d+)"
)
SAW = re.compile(r"SAW ([0-9a-f]{16})")


def test_a_failure_names_its_worker_seed_and_reproduces_alone(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_fleet_suite=FAILING_SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, failed=1)
    seeds = assert_two_workers_with_their_own_seeds(result)
    output = "\n".join(result.stdout.lines)
    (found,) = REPRODUCE.findall(output)
    worker, seed, nodeid, seed_again = found
    assert seed == seed_again
    assert int(seed) == seeds[worker]
    # The failure's message shows in its traceback and, when the terminal is wide enough, in
    # the short summary too: one value, however many times it is printed.
    (saw,) = set(SAW.findall(output))
    # Its artifacts are in its worker's own folder, with that seed.
    (artifacts,) = (pytester.path / "sim-artifacts" / worker).iterdir()
    assert artifacts.name.endswith("test_fails_with_what_it_saw")
    assert (artifacts / "seed.txt").read_text().strip() == seed
    assert not (pytester.path / "sim-artifacts" / ({"gw0", "gw1"} - {worker}).pop()).exists()

    alone = pytester.runpytest_subprocess(nodeid, f"--sim-seed={seed}", "-p", "no:cacheprovider")
    alone.assert_outcomes(failed=1)
    assert set(SAW.findall("\n".join(alone.stdout.lines))) == {saw}
    alone.stdout.fnmatch_lines([f"*ran with --sim-seed={seed}; alone: pytest *"])
