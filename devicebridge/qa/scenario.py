"""Run a scenario (``simulators.scenario``) against the bridge and judge what the bridge did.

:func:`run_scenario` builds the scenario's devices, hands and faults in a simulated world
on a fast virtual clock, connects a :class:`~devicebridge.qa.bridge.QaBridge`, runs the
routine on every device of the routine's kind (the others stream), and checks the
``[expect]`` tables. The :class:`ScenarioResult` carries the verdict, the seed, the event
timeline and a digest of the stored telemetry; :meth:`ScenarioResult.write_artifacts`
leaves them in a folder so a failure can be looked at and replayed.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from devicebridge.core.engine import Decision
from devicebridge.core.routine import DeviceKindName, MassageStep, Routine
from devicebridge.device.session import SessionStats
from devicebridge.errors import DeviceBridgeError, QaError
from devicebridge.qa.bridge import QaBridge, TimelineEntry, load_routine, telemetry_digest
from devicebridge.run.summary import RunSummary
from devicebridge.storage.writer import start_store_writer
from protocols import Zone
from protocols.constants import zone_named
from simulators import SimulatedWorld, VirtualClock
from simulators.faults.spec import FaultRecord
from simulators.scenario.build import build_scenario
from simulators.scenario.spec import Scenario, load_scenario, selects

# Keys of an [[expect]] table and what they check (docs/qa.md).
EXPECT_KEYS: Final = frozenset(
    {
        "device",
        "status",
        "end_reason",
        "decisions",
        "forbid_decisions",
        "events",
        "summary",
        "max_lost_samples",
        "min_malformed",
        "min_duplicates",
        "min_gaps",
        "min_reconnects",
        "min_device_restarts",
        "min_stop_all",
        "clock_drift_ppm",
        "stored_contiguous",
    }
)
MATCHER_KEYS: Final = frozenset({"kind", "reason", "message", "step"})
_MIN_COUNTERS: Final = {
    "min_malformed": "malformed",
    "min_duplicates": "duplicates",
    "min_gaps": "gaps",
    "min_reconnects": "reconnects",
    "min_device_restarts": "device_restarts",
}
KIND_OF_DEVICE: Final = {"massager": DeviceKindName.MASSAGER, "mask": DeviceKindName.LED_MASK}


@dataclass
class DeviceOutcome:
    """What the bridge did with one device."""

    label: str
    serial_number: str
    run: RunSummary | None
    stats: SessionStats
    events: list[str]
    clock_drift_ppm: float | None
    stop_all_writes: int = 0
    telemetry_sha256: str | None = None
    stored_samples: int = 0
    stored_contiguous: bool | None = None

    @property
    def decisions(self) -> tuple[Decision, ...]:
        return self.run.decisions if self.run is not None else ()

    def to_json(self) -> dict[str, Any]:
        run = self.run
        return {
            "label": self.label,
            "serial_number": self.serial_number,
            "status": run.status if run else None,
            "end_reason": run.end_reason if run else None,
            "summary": dict(run.summary) if run else None,
            "decisions": [
                {"at_s": d.at_s, "kind": d.kind.value, "reason": d.reason, "step": d.step}
                for d in self.decisions
            ],
            "stats": {k: getattr(self.stats, k) for k in SessionStats.__dataclass_fields__},
            "events": self.events,
            "clock_drift_ppm": self.clock_drift_ppm,
            "stop_all_writes": self.stop_all_writes,
            "telemetry_sha256": self.telemetry_sha256,
            "stored_samples": self.stored_samples,
            "stored_contiguous": self.stored_contiguous,
        }


@dataclass
class ScenarioResult:
    scenario: Scenario
    seed: int
    devices: dict[str, DeviceOutcome]
    timeline: list[TimelineEntry]
    failures: list[str]
    virtual_s: float
    wall_s: float
    workdir: Path | None = None
    artifacts: Path | None = field(default=None)
    workers: int = 1  # processes the devices were shared out over

    @property
    def passed(self) -> bool:
        return not self.failures

    def verdict(self) -> str:
        head = (
            f"{'PASS' if self.passed else 'FAIL'} {self.scenario.name} (seed {self.seed}): "
            f"{len(self.devices)} device(s), {self.virtual_s:.1f} s virtual in "
            f"{self.wall_s:.2f} s wall"
        )
        lines = [head, *(f"  - {failure}" for failure in self.failures)]
        if not self.passed:
            workers = f" --workers {self.workers}" if self.workers > 1 else ""
            lines.append(
                f"  replay: devicebridge-sim scenario run {self.scenario.path or '<file>'} "
                f"--seed {self.seed}{workers}"
            )
        return "\n".join(lines)

    def timeline_jsonl(self) -> str:
        return "".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in self.timeline)

    def write_artifacts(self, folder: Path) -> Path:
        """Seed, scenario, timeline, verdict, outcomes and the telemetry stores, in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "seed.txt").write_text(f"{self.seed}\n", "utf-8")
        (folder / "scenario.toml").write_text(self.scenario.source_text, "utf-8")
        (folder / "timeline.jsonl").write_text(self.timeline_jsonl(), "utf-8")
        (folder / "verdict.txt").write_text(self.verdict() + "\n", "utf-8")
        outcomes = {label: o.to_json() for label, o in self.devices.items()}
        (folder / "outcomes.json").write_text(json.dumps(outcomes, indent=2), "utf-8")
        if self.workdir is not None and self.workdir.exists():
            telemetry = folder / "telemetry"
            telemetry.mkdir(exist_ok=True)
            for store in self.workdir.glob("*.sqlite3"):
                shutil.copy2(store, telemetry / store.name)
        self.artifacts = folder
        return folder


# --------------------------------------------------------------------------- running


async def run_scenario(
    scenario: Scenario | Path | str,
    *,
    seed: int | None = None,
    workdir: Path | None = None,
    workers: int = 1,
    fleet_generation: bool = True,
) -> ScenarioResult:
    """Run ``scenario`` (a parsed scenario or a file) with ``seed`` (default: its own).

    ``workdir`` receives one session store per device (a temporary folder by default,
    removed afterwards unless the caller keeps the result's artifacts).

    ``workers`` > 1 shares the devices out over that many processes (device ``k`` to
    worker ``k % workers``), each with its own virtual clock, world and bridge; the parent
    merges their outcomes and timelines and checks the expectations. Every device keeps its
    place in the whole scenario (identity, noise, fault schedule). A run replays exactly
    with the same seed and the same number of workers. Between worker counts a device can
    differ in detail where it met another device at the same virtual instant (say, which
    of two tasks due then ran first), as it can when other devices join a scenario.

    ``fleet_generation``: the simulated massagers of a process take their samples together
    (the default), or each on its own (the same bytes; for comparing the two).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    used_seed = scenario.seed if seed is None else seed
    base_dir = scenario.path.parent if scenario.path is not None else None
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="devicebridge-qa-") as tmp:
            result = await _run(scenario, used_seed, Path(tmp), base_dir, workers, fleet_generation)
            result.workdir = None
            return result
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the run
    return await _run(scenario, used_seed, workdir, base_dir, workers, fleet_generation)


def scenario_routine(scenario: Scenario, bridge: QaBridge, base_dir: Path | None) -> Routine | None:
    if scenario.routine_text is not None:
        from devicebridge.core.routine import parse_routine

        return parse_routine(scenario.routine_text, bridge.policy, label=f"{scenario.name} routine")
    if scenario.routine is None:
        return None
    return load_routine(scenario.routine, bridge.policy, base_dir=base_dir)


@dataclass
class _ShardResult:
    """What one process saw of its share of the devices (before the expectations)."""

    outcomes: dict[str, DeviceOutcome]
    timeline: list[TimelineEntry]
    failures: list[str]
    virtual_s: float


async def _run(
    scenario: Scenario,
    seed: int,
    workdir: Path,
    base_dir: Path | None,
    workers: int,
    fleet_generation: bool,
) -> ScenarioResult:
    started_wall_s = time.perf_counter()
    labels = scenario.labels()
    shards = [labels[k::workers] for k in range(min(workers, len(labels)))]
    if len(shards) <= 1:
        parts = [await _run_shard(scenario, seed, workdir, base_dir, None, fleet_generation)]
    else:
        loop = asyncio.get_running_loop()
        # spawn, not fork: a forked child would inherit this process's running event loop.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(shards), mp_context=context) as pool:
            parts = list(
                await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            pool,
                            _run_shard_process,
                            scenario,
                            seed,
                            workdir,
                            base_dir,
                            shard,
                            fleet_generation,
                        )
                        for shard in shards
                    )
                )
            )
    outcomes = {label: o for part in parts for label, o in part.outcomes.items()}
    outcomes = {label: outcomes[label] for label in labels if label in outcomes}
    timeline = _in_order(labels, [e for part in parts for e in part.timeline])
    failures = [f for part in parts for f in part.failures]
    if not failures:
        failures = check_expectations(scenario, outcomes, _labelled(scenario))
    return ScenarioResult(
        scenario,
        seed,
        outcomes,
        timeline,
        failures,
        max(part.virtual_s for part in parts),
        time.perf_counter() - started_wall_s,
        workdir,
        workers=len(parts),
    )


def _labelled(scenario: Scenario) -> list[tuple[str, str]]:
    """(label, group) of every device of the scenario, in order."""
    return [(label, spec.label) for spec in scenario.devices for label in spec.labels()]


def _in_order(labels: Sequence[str], entries: Sequence[TimelineEntry]) -> list[TimelineEntry]:
    """The timeline in its stated order: by time, then by the device's place in the
    scenario; one device's entries of the same instant keep the order they happened in.

    Which of two devices the event loop served first within one virtual instant is not
    part of a run, so it is not part of the timeline either.
    """
    place = {label: index for index, label in enumerate(labels)}
    return sorted(entries, key=lambda e: (e.t_s, place.get(e.device, len(place))))


def _run_shard_process(
    scenario: Scenario,
    seed: int,
    workdir: Path,
    base_dir: Path | None,
    labels: list[str],
    fleet_generation: bool,
) -> _ShardResult:
    """A worker process's whole job: its devices, on its own loop and virtual clock."""
    return asyncio.run(_run_shard(scenario, seed, workdir, base_dir, labels, fleet_generation))


async def _run_shard(
    scenario: Scenario,
    seed: int,
    workdir: Path,
    base_dir: Path | None,
    only: Collection[str] | None,
    fleet_generation: bool = True,
) -> _ShardResult:
    clock = VirtualClock()
    world = SimulatedWorld(seed=seed, clock=clock, fleet_generation=fleet_generation)
    probe = QaBridge(world, workdir=workdir)  # for the policy and routine loading only
    routine = scenario_routine(scenario, probe, base_dir)
    if routine is not None:
        # Its runs store their sessions: the store's helper processes start now, while the
        # world and the bridge come up, not when the first run's record waits for them
        # (a tenth of a second or more each to start).
        start_store_writer()
    bands = _routine_bands(routine)
    label_of_serial: dict[str, str] = {}
    timeline_entries: list[TimelineEntry] = []

    def on_fault(record: FaultRecord) -> None:
        # Fault records join the timeline as they happen, in order with everything else.
        timeline_entries.append(
            TimelineEntry(
                record.t_s,
                "fault",
                label_of_serial.get(record.device, record.device),
                str(record.kind),
                record.detail,
            )
        )

    built = build_scenario(scenario, world, bands_kpa=bands, on_record=on_fault, only=only)
    label_of_serial.update({b.device.serial_number: b.label for b in built.devices})
    bridge = QaBridge(
        world, workdir=workdir, seed=seed, labels={b.device: b.label for b in built.devices}
    )
    bridge.timeline.entries = timeline_entries

    outcomes: dict[str, DeviceOutcome] = {}
    failures: list[str] = []
    async with world:
        clock.start()
        try:
            built.start_faults()
            await bridge.connect([b.device for b in built.devices])
            runs = await _run_devices(scenario, bridge, built.devices, routine)
            events = _events_by_device(bridge.timeline.entries)
            for b in built.devices:
                outcomes[b.label] = _outcome(
                    bridge, b.label, b.device, runs.get(b.label), events.get(b.label, [])
                )
        except (DeviceBridgeError, QaError) as exc:
            failures.append(f"the run failed: {exc}")
        finally:
            for b in built.devices:
                b.injector.stop()
            await bridge.close()
            await clock.stop()
    return _ShardResult(
        outcomes, _in_order(scenario.labels(), timeline_entries), failures, clock.now_s()
    )


def _routine_bands(routine: Routine | None) -> dict[Zone, tuple[float, float]]:
    bands: dict[Zone, tuple[float, float]] = {}
    if routine is None:
        return bands
    for step in routine.steps:
        if isinstance(step, MassageStep):
            bands.setdefault(zone_named(step.zone), (step.pressure_min_kpa, step.pressure_max_kpa))
    return bands


async def _run_devices(
    scenario: Scenario, bridge: QaBridge, devices: Sequence[Any], routine: Routine | None
) -> dict[str, RunSummary]:
    runs: dict[str, RunSummary] = {}

    async def one(label: str, device: Any, routine: Routine) -> None:
        runs[label] = await bridge.run_routine(device, routine, max_duration_s=scenario.duration_s)

    runnable = [
        (b.label, b.device)
        for b in devices
        if routine is not None
        and KIND_OF_DEVICE[scenario.spec_of(b.label).kind] is routine.device_kind
    ]
    if routine is not None and runnable:
        await asyncio.gather(*(one(label, device, routine) for label, device in runnable))
    else:
        await bridge.clock.sleep(scenario.duration_s)
    return runs


def _events_by_device(entries: Sequence[TimelineEntry]) -> dict[str, list[str]]:
    """The device events' names per device label, in order."""
    events: dict[str, list[str]] = {}
    for entry in entries:
        if entry.what == "event":
            events.setdefault(entry.device, []).append(entry.detail.split()[0])
    return events


def _outcome(
    bridge: QaBridge, label: str, device: Any, run: RunSummary | None, events: list[str]
) -> DeviceOutcome:
    session = bridge.sessions[device]
    runner = bridge.runners.get(device)
    outcome = DeviceOutcome(
        label,
        device.serial_number,
        run,
        session.stats,
        events,
        session.clock_drift_ppm,
        runner.stop_all_writes if runner is not None else 0,
    )
    if run is not None and run.session_id is not None:
        sequences, samples = bridge.store(device).telemetry(run.session_id)
        outcome.telemetry_sha256 = telemetry_digest(sequences, samples)
        outcome.stored_samples = int(samples.shape[0])
        outcome.stored_contiguous = bool(
            len(sequences) == 0 or int(sequences[-1]) - int(sequences[0]) + 1 == len(sequences)
        )
    return outcome


# --------------------------------------------------------------------------- expectations


def check_expectations(
    scenario: Scenario,
    outcomes: Mapping[str, DeviceOutcome],
    devices: Sequence[tuple[str, str]],
) -> list[str]:
    """Every broken expectation, as one line naming the device and what differed.

    ``devices``: (label, group) of each device the expectations apply to, in order.
    """
    failures: list[str] = []
    for index, expect in enumerate(scenario.expect):
        where = f"[[expect]] #{index + 1}"
        unknown = set(expect) - EXPECT_KEYS
        if unknown:
            failures.append(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(EXPECT_KEYS))})"
            )
            continue
        selector = str(expect.get("device", "*"))
        for label, group in devices:
            if not selects(selector, label, scenario.spec_of(label).kind) and not (
                selects(selector, label, group)
            ):
                continue
            outcome = outcomes.get(label)
            if outcome is None:
                failures.append(f"{label}: no outcome")
                continue
            failures += [f"{label}: {f}" for f in _check(expect, outcome, where)]
    return failures


def _check(expect: Mapping[str, Any], outcome: DeviceOutcome, where: str) -> list[str]:
    out: list[str] = []
    run = outcome.run
    if "status" in expect:
        got = run.status if run else None
        if got != expect["status"]:
            reason = f" ({run.end_reason})" if run and run.end_reason else ""
            out.append(f"session status {got!r}{reason}, expected {expect['status']!r}")
    if "end_reason" in expect:
        got_reason = (run.end_reason if run else None) or ""
        if str(expect["end_reason"]) not in got_reason:
            out.append(f"end reason {got_reason!r} does not contain {expect['end_reason']!r}")
    decisions = outcome.decisions
    if "decisions" in expect:
        matchers = _matchers(expect["decisions"], f"{where} decisions", out)
        position = 0
        for matcher in matchers:
            while position < len(decisions) and not _matches(matcher, decisions[position]):
                position += 1
            if position == len(decisions):
                seen = ", ".join(f"{d.kind.value}/{d.reason}" for d in decisions) or "none"
                out.append(f"expected decision {_show(matcher)} (in order); decisions: {seen}")
                break
            position += 1
    if "forbid_decisions" in expect:
        for matcher in _matchers(expect["forbid_decisions"], f"{where} forbid_decisions", out):
            hits = [d for d in decisions if _matches(matcher, d)]
            if hits:
                out.append(
                    f"forbidden decision {_show(matcher)} at {hits[0].at_s:.2f} s: "
                    f"{hits[0].message}"
                )
    for name in expect.get("events", []):
        if name not in outcome.events:
            out.append(f"expected the bridge to receive event {name}; got {outcome.events}")
    for key, want in dict(expect.get("summary", {})).items():
        got_value = run.summary.get(key) if run else None
        if got_value != want:
            out.append(f"summary {key} = {got_value!r}, expected {want!r}")
    if "max_lost_samples" in expect and outcome.stats.lost_samples > expect["max_lost_samples"]:
        out.append(
            f"{outcome.stats.lost_samples} samples lost, "
            f"at most {expect['max_lost_samples']} allowed"
        )
    for key, stat in _MIN_COUNTERS.items():
        if key in expect and getattr(outcome.stats, stat) < expect[key]:
            out.append(f"{stat} = {getattr(outcome.stats, stat)}, expected at least {expect[key]}")
    if "min_stop_all" in expect and outcome.stop_all_writes < expect["min_stop_all"]:
        out.append(
            f"STOP_ALL sent {outcome.stop_all_writes} times, "
            f"expected at least {expect['min_stop_all']}"
        )
    if "clock_drift_ppm" in expect:
        low, high = expect["clock_drift_ppm"]
        drift = outcome.clock_drift_ppm
        if drift is None or not low <= drift <= high:
            out.append(f"clock drift {drift} ppm, expected between {low} and {high}")
    if "stored_contiguous" in expect and outcome.stored_contiguous != expect["stored_contiguous"]:
        out.append(f"stored telemetry contiguous = {outcome.stored_contiguous}")
    return out


def _matchers(raw: Any, where: str, out: list[str]) -> list[Mapping[str, Any]]:
    if not isinstance(raw, list):
        out.append(f"{where}: expected a list of {{kind, reason, message, step}} tables")
        return []
    matchers: list[Mapping[str, Any]] = []
    for item in raw:
        if not isinstance(item, dict) or not item or set(item) - MATCHER_KEYS:
            out.append(f"{where}: {item!r} is not a table of {', '.join(sorted(MATCHER_KEYS))}")
            continue
        matchers.append(item)
    return matchers


def _matches(matcher: Mapping[str, Any], decision: Decision) -> bool:
    if "kind" in matcher and decision.kind.value != matcher["kind"]:
        return False
    if "reason" in matcher and decision.reason != matcher["reason"]:
        return False
    if "step" in matcher and decision.step != matcher["step"]:
        return False
    return "message" not in matcher or str(matcher["message"]) in decision.message


def _show(matcher: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v!r}" for k, v in sorted(matcher.items())) + "}"
