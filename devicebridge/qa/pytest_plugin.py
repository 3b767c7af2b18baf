"""pytest plugin: simulated devices, faults, the virtual clock and a running bridge as fixtures.

Registered under the ``pytest11`` entry point, so it loads wherever devicebridge is
installed. Options: ``--sim-seed N`` (default: a fresh seed, printed in the header and the
summary so that a failure can be replayed exactly) and ``--sim-artifacts DIR`` (where a
failing test leaves its seed, scenario, event timeline and telemetry; default
``sim-artifacts``). Files named ``scenario_*.toml`` are collected and run as tests.

Under pytest-xdist (``-n 2``, ``-n auto``, remote workers with ``--tx``) the run's seed is
the session's: each worker derives its own from it and its id (:func:`worker_seed`), keeps
its artifacts under ``DIR/<worker id>``, and its seed is printed as the worker comes up and
in the summary. A failing test's report names the seed it ran with, and
``pytest <test> --sim-seed <that seed>`` (without ``-n``) runs it alone the same way.

Fixtures (all function-scoped but ``sim_seed``):

``sim_seed``      the run's seed
``sim_clock``     a fast :class:`~simulators.VirtualClock`
``sim_world``     a started :class:`~simulators.SimulatedWorld` on it (mark a test with
                  ``@pytest.mark.sim_devices(massagers=2, masks=1)`` to populate it)
``sim_massager``  a simulated massager whose hand follows the bridge's guidance;
                  ``sim_mask`` an LED mask (worn)
``sim_fleet``     ``sim_fleet(n, kind="massager")``: n more devices
``sim_faults``    ``sim_faults(device, "drop", rate=0.1, at_s=5)``: add a fault, get the injector
``bridge``        a :class:`~devicebridge.qa.QaBridge` connected to every device of the
                  world, with the clock running
``sim_scenario``  ``await sim_scenario(path)``: run a scenario file, returns the result

The async fixtures (``sim_world``, ``bridge`` and those built on them) need pytest-asyncio
(``pip install 'devicebridge[qa]'``); without it the plugin still loads, its other fixtures
work, and an async one fails its test with that hint.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from devicebridge.qa.bridge import QaBridge
from devicebridge.qa.scenario import ScenarioResult, run_scenario
from simulators import SimulatedDevice, SimulatedWorld, VirtualClock
from simulators.errors import ScenarioError
from simulators.faults.injector import FaultInjector
from simulators.faults.spec import make_fault
from simulators.scenario.hand import ScenarioHand
from simulators.scenario.spec import load_scenario

SEED_KEY: Final = pytest.StashKey[int]()  # this process's seed (a worker's own under xdist)
SESSION_SEED_KEY: Final = pytest.StashKey[int]()
EXPLICIT_SEED_KEY: Final = pytest.StashKey[bool]()
WORKER_ID_KEY: Final = pytest.StashKey[str]()  # only in an xdist worker
WORKER_SEEDS_KEY: Final = pytest.StashKey[dict[str, int]]()  # the xdist controller's
# What the xdist controller hands each worker (its workerinput).
WORKER_INPUT_SEED: Final = "devicebridge_sim_session_seed"
WORKER_INPUT_EXPLICIT: Final = "devicebridge_sim_explicit_seed"
REPORTS_KEY: Final = pytest.StashKey[dict[str, pytest.TestReport]]()
DEFAULT_ARTIFACTS: Final = "sim-artifacts"
SEED_LIMIT: Final = 2**31
SCENARIO_FILE: Final = re.compile(r"^scenario_.*\.toml$")
# The fixtures that run on the simulator's seed.
SIM_FIXTURES: Final = frozenset(
    {
        "sim_seed",
        "sim_world",
        "sim_massager",
        "sim_mask",
        "sim_fleet",
        "sim_faults",
        "bridge",
        "sim_scenario",
    }
)


def async_fixture(func: Callable[..., Any]) -> Any:
    """``pytest_asyncio.fixture``, or without pytest-asyncio a fixture that fails with the
    command that installs it."""
    try:
        import pytest_asyncio
    except ImportError:  # a bridge's install: pytest without pytest-asyncio
        pass
    else:
        return pytest_asyncio.fixture(func)
    name = func.__name__

    @pytest.fixture(name=name)
    def needs_pytest_asyncio() -> None:
        pytest.fail(
            f"the fixture {name!r} is async and needs pytest-asyncio: "
            "pip install 'devicebridge[qa]'",
            pytrace=False,
        )

    return needs_pytest_asyncio


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("devicebridge-sim", "devicebridge simulated devices")
    group.addoption(
        "--sim-seed",
        type=int,
        default=None,
        help="seed of the simulated devices and faults (default: a fresh one, printed)",
    )
    group.addoption(
        "--sim-artifacts",
        default=DEFAULT_ARTIFACTS,
        help=f"folder for the artifacts of failing tests (default: {DEFAULT_ARTIFACTS})",
    )


def worker_seed(session_seed: int, worker_id: str) -> int:
    """The seed of the xdist worker ``worker_id`` (``gw0``, ``gw1``, ...) in a session
    seeded with ``session_seed``: the same pair always gives the same seed."""
    digest = hashlib.sha256(f"{session_seed}/{worker_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_LIMIT


def pytest_configure(config: pytest.Config) -> None:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None and WORKER_INPUT_SEED in workerinput:
        # An xdist worker: its own seed, from the session's and its id.
        session_seed = int(workerinput[WORKER_INPUT_SEED])
        worker_id = str(workerinput["workerid"])
        config.stash[EXPLICIT_SEED_KEY] = bool(workerinput[WORKER_INPUT_EXPLICIT])
        config.stash[WORKER_ID_KEY] = worker_id
        seed = worker_seed(session_seed, worker_id)
    else:
        session_seed = config.getoption("sim_seed")
        config.stash[EXPLICIT_SEED_KEY] = session_seed is not None
        if session_seed is None:
            session_seed = int.from_bytes(os.urandom(4), "little") % SEED_LIMIT
        if session_seed < 0:
            raise pytest.UsageError(f"--sim-seed must be non-negative, got {session_seed}")
        seed = session_seed
    config.stash[SESSION_SEED_KEY] = session_seed
    config.stash[SEED_KEY] = seed
    config.addinivalue_line(
        "markers", "sim_devices(massagers=0, masks=0): devices in the sim_world fixture"
    )


def _seed_line(config: pytest.Config) -> str:
    return f"devicebridge-sim: --sim-seed={config.stash[SESSION_SEED_KEY]}"


def _worker_seed_line(worker_id: str, seed: int) -> str:
    return f"devicebridge-sim: [{worker_id}] --sim-seed={seed}"


def _distributed(config: pytest.Config) -> bool:
    """Whether this is the controller of an xdist run (tests go to worker processes)."""
    return str(config.getoption("dist", "no")) != "no"


def pytest_report_header(config: pytest.Config) -> str:
    if _distributed(config):
        return (
            _seed_line(config) + " (the session's: each xdist worker derives its own seed "
            "from it, printed per worker; pass it again to replay this run)"
        )
    return _seed_line(config) + " (pass it again to replay this run)"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    terminalreporter.write_line(_seed_line(config))
    for worker_id, seed in sorted(config.stash.get(WORKER_SEEDS_KEY, {}).items()):
        terminalreporter.write_line(_worker_seed_line(worker_id, seed))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist's controller, setting up a worker: the session's seed goes with it."""
    config: pytest.Config = node.config
    session_seed = config.stash[SESSION_SEED_KEY]
    node.workerinput[WORKER_INPUT_SEED] = session_seed
    node.workerinput[WORKER_INPUT_EXPLICIT] = config.stash[EXPLICIT_SEED_KEY]
    worker_id = str(node.workerinput["workerid"])
    seeds = config.stash.setdefault(WORKER_SEEDS_KEY, {})
    seeds[worker_id] = worker_seed(session_seed, worker_id)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodeready(node: Any) -> None:
    """xdist's controller: a worker is up; its seed is printed now."""
    config: pytest.Config = node.config
    worker_id = str(node.workerinput["workerid"])
    seed = config.stash.get(WORKER_SEEDS_KEY, {}).get(worker_id)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if seed is not None and reporter is not None:
        reporter.write_line(_worker_seed_line(worker_id, seed))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    item.stash.setdefault(REPORTS_KEY, {})[report.when] = report
    if report.failed and _simulated(item):
        seed = item.config.stash[SEED_KEY]
        where = item.config.stash.get(WORKER_ID_KEY, None)
        ran = f"ran on xdist worker {where} with" if where else "ran with"
        report.sections.append(
            (
                "devicebridge-sim",
                f"{ran} --sim-seed={seed}; alone: pytest '{item.nodeid}' --sim-seed={seed}",
            )
        )
    return report


def _simulated(item: pytest.Item) -> bool:
    """Whether ``item`` ran on the simulator's seed (a scenario file, or a sim fixture)."""
    if isinstance(item, ScenarioItem):
        return True
    names = getattr(item, "fixturenames", ())
    return any(name in SIM_FIXTURES for name in names)


def _failed(item: pytest.Item) -> bool:
    reports = item.stash.get(REPORTS_KEY, {})
    return any(r.failed for r in reports.values())


def guided_massager(world: SimulatedWorld) -> SimulatedDevice:
    """A massager held by a hand that goes where the bridge guides it (SET_ZONE)."""
    hand = ScenarioHand((), guided=True)
    device = world.add_massager(hand=hand)  # type: ignore[arg-type]
    hand.follow(device)
    return device


def artifacts_dir(config: pytest.Config, nodeid: str) -> Path:
    """Where the test ``nodeid`` leaves its artifacts: under the worker's own folder in an
    xdist worker."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")
    base = Path(config.getoption("sim_artifacts")).resolve()
    worker_id = config.stash.get(WORKER_ID_KEY, None)
    return (base / worker_id / safe) if worker_id else (base / safe)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def sim_seed(pytestconfig: pytest.Config) -> int:
    """The seed of this run (``--sim-seed``, or the fresh one in the header); in an xdist
    worker, the worker's own (see :func:`worker_seed`)."""
    return pytestconfig.stash[SEED_KEY]


@pytest.fixture
def sim_clock() -> VirtualClock:
    return VirtualClock()


class SimRecorder:
    """What a test used, written to its artifacts folder when it fails."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.bridges: list[QaBridge] = []
        self.scenarios: list[ScenarioResult] = []
        self.injectors: list[FaultInjector] = []

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "seed.txt").write_text(f"{self.seed}\n", "utf-8")
        for index, result in enumerate(self.scenarios):
            result.write_artifacts(folder / f"scenario-{index}")
        lines: list[str] = []
        for bridge in self.bridges:
            lines.append(bridge.timeline.to_jsonl())
            telemetry = folder / "telemetry"
            for store in bridge.workdir.glob("*.sqlite3"):
                telemetry.mkdir(exist_ok=True)
                (telemetry / store.name).write_bytes(store.read_bytes())
        for injector in self.injectors:
            for record in injector.records:
                lines.append(
                    f'{{"t_s": {record.t_s}, "source": "fault", "device": '
                    f'"{record.device}", "what": "{record.kind}", "detail": "{record.detail}"}}\n'
                )
        if lines:
            (folder / "timeline.jsonl").write_text("".join(lines), "utf-8")
        return folder


@pytest.fixture
def sim_recorder(request: pytest.FixtureRequest, sim_seed: int) -> Iterator[SimRecorder]:
    recorder = SimRecorder(sim_seed)
    yield recorder
    if _failed(request.node):
        folder = recorder.write(artifacts_dir(request.config, request.node.nodeid))
        request.node.add_report_section("teardown", "devicebridge-sim", f"artifacts: {folder}")


@async_fixture
async def sim_world(
    request: pytest.FixtureRequest,
    sim_seed: int,
    sim_clock: VirtualClock,
    sim_recorder: SimRecorder,
) -> AsyncIterator[SimulatedWorld]:
    world = SimulatedWorld(seed=sim_seed, clock=sim_clock)
    marker = request.node.get_closest_marker("sim_devices")
    if marker is not None:
        for _ in range(int(marker.kwargs.get("massagers", 0))):
            guided_massager(world)
        for _ in range(int(marker.kwargs.get("masks", 0))):
            world.add_mask()
    async with world:
        try:
            yield world
        finally:
            for injector in sim_recorder.injectors:
                injector.stop()
            if sim_clock.is_running:
                await sim_clock.stop()


@pytest.fixture
def sim_massager(sim_world: SimulatedWorld) -> SimulatedDevice:
    """A massager whose hand follows the bridge's guidance, in the middle of each zone's band."""
    return guided_massager(sim_world)


@pytest.fixture
def sim_mask(sim_world: SimulatedWorld) -> SimulatedDevice:
    return sim_world.add_mask()


@pytest.fixture
def sim_fleet(sim_world: SimulatedWorld) -> Callable[..., list[SimulatedDevice]]:
    def make(count: int, kind: str = "massager") -> list[SimulatedDevice]:
        if kind not in ("massager", "mask"):
            raise ValueError(f"sim_fleet kind must be 'massager' or 'mask', got {kind!r}")
        if kind == "mask":
            return [sim_world.add_mask() for _ in range(count)]
        return [guided_massager(sim_world) for _ in range(count)]

    return make


@pytest.fixture
def sim_faults(
    sim_world: SimulatedWorld, sim_recorder: SimRecorder
) -> Callable[..., FaultInjector]:
    injectors: dict[SimulatedDevice, FaultInjector] = {}

    def add(device: SimulatedDevice, kind: str, **options: Any) -> FaultInjector:
        injector = injectors.get(device)
        if injector is None:
            injector = FaultInjector(device, seed=sim_world.seed, world=sim_world)
            injectors[device] = injector
            sim_recorder.injectors.append(injector)
            injector.start()
        injector.add(make_fault(kind, where=f"sim_faults({kind!r})", **options))
        return injector

    return add


@async_fixture
async def bridge(
    request: pytest.FixtureRequest,
    sim_world: SimulatedWorld,
    sim_recorder: SimRecorder,
    tmp_path: Path,
) -> AsyncIterator[QaBridge]:
    # Devices the test asks for exist before the bridge connects to them.
    for name in ("sim_massager", "sim_mask"):
        if name in request.fixturenames:
            request.getfixturevalue(name)
    qa = QaBridge(sim_world, workdir=tmp_path / "bridge")
    sim_recorder.bridges.append(qa)
    sim_world.clock.start()
    try:
        if sim_world.devices:
            await qa.connect()
        yield qa
    finally:
        await qa.close()


@pytest.fixture
def sim_scenario(
    request: pytest.FixtureRequest, sim_recorder: SimRecorder, tmp_path: Path
) -> Callable[..., Any]:
    explicit = request.config.stash[EXPLICIT_SEED_KEY]

    async def run(path: Path | str, *, seed: int | None = None) -> ScenarioResult:
        used = seed if seed is not None else (sim_recorder.seed if explicit else None)
        workdir = tmp_path / f"scenario-{len(sim_recorder.scenarios)}"
        result = await run_scenario(Path(path), seed=used, workdir=workdir)
        sim_recorder.scenarios.append(result)
        return result

    return run


# --------------------------------------------------------------------------- scenario files


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    if SCENARIO_FILE.match(file_path.name):
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


class ScenarioFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        yield ScenarioItem.from_parent(self, name=self.path.stem)


class ScenarioFailed(Exception):
    """A scenario's expectations were not met (the message is the verdict)."""


class ScenarioItem(pytest.Item):
    """One scenario file, run against the bridge."""

    def runtest(self) -> None:
        import asyncio
        import tempfile

        explicit = self.config.stash[EXPLICIT_SEED_KEY]
        seed = self.config.stash[SEED_KEY] if explicit else None
        try:
            scenario = load_scenario(self.path)
        except ScenarioError as exc:
            raise ScenarioFailed(str(exc)) from None
        with tempfile.TemporaryDirectory(prefix="devicebridge-qa-") as tmp:
            result = asyncio.run(run_scenario(scenario, seed=seed, workdir=Path(tmp)))
            if not result.passed:
                folder = result.write_artifacts(artifacts_dir(self.config, self.nodeid))
                raise ScenarioFailed(f"{result.verdict()}\n  artifacts: {folder}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ScenarioFailed):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"scenario {self.name}"
