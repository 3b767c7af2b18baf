"""Safety-stop latency: a too-high pressure sample reaching the bridge -> STOP_ALL written.

Simulated massagers stream at 100 Hz (10 batches a second) in real time, each held by a
hand that presses above the cheek cap for 0.2 s of every second. Devices boot at random
phases within one batch interval (seeded), as independent radios would: their batches
cluster and collide at times, which an even stagger would never show. Each device runs the
real :class:`~devicebridge.run.runner.RoutineRunner` (host mode, engine, a real SQLite
store and one store writer shared by all runs, as ``devicebridge serve`` has) over a real
transport, with the shipped policy: over-cap events end a session (its end, the commit
of the session's record, happens while other devices' samples arrive), and the next run
starts at once, admitted against the whole history stored so
far (the routine is a drainage massage, a category the policy admits any number of
times a day, so every device keeps running sessions for the whole window; a device loop
that ends fails the bench). A stop is measured while a run drives its device (from the
run's start, its record stored and its engine started, to its end): samples that come
between two runs, when the previous run's STOP_ALL has stopped the device and the next
has commanded nothing yet, are counted apart ("between runs").

The devices never pause, so, as in ``devicebridge serve``, no finished session is
compacted within the window: compaction (another process) waits for a pause in the
telemetry, at most ``COMPACT_WAIT_S`` (a minute) after a session ended, longer than the
window (:data:`devicebridge.storage.writer.COMPACT_IDLE_S` gives the p99 measured with
every session compacted as it ended).

The process is set up as ``devicebridge serve`` sets itself up
(:func:`devicebridge.app.event_loop_first`, one policy for every device, and what
start-up made frozen once the devices are connected), for every variant alike.

Two setups, each measured in the same run against baselines:

* **serial, devices in another process** (the headline): a child process
  (``python -m bench.bench_latency serve N``) runs the simulated devices on ptys, so the
  bridge's process does nothing but bridge. The sample "reaches the bridge" when the
  device's frame is written into the pty (stamped in the device process with
  CLOCK_MONOTONIC, which both processes share); the clock stops when the STOP_ALL frame
  has been written to the bridge's fd. The time the bridge's event loop takes to get
  to a readable fd is therefore included. Also shown: from the bridge's read of that
  frame (``read ->``), the part spent in the bridge's code alone.
* **BLE, devices in the bridge's process** (the old setup): the bleak simulator backend
  only works in-process, so simulator work and the realtime clock's catch-up share the
  bridge's loop. From the telemetry notification entering the transport's callback to the
  STOP_ALL entering ``write_control``.

Baselines, same devices and transport, no engine and no store:

* ``observer``: a bare telemetry observer that compares the pressure with the cap and
  starts STOP_ALL (:meth:`DeviceSession.send_soon`): the floor of the runner's path.
* ``queued``: a bare consumer of the session's telemetry subscription that awaits
  STOP_ALL: the floor of the path the runner used before (callback -> queue -> task).

Also shown (serial), as a diagnostic and not a baseline: ``runner, no store``, the same
runs with no session store (nothing written, no writer's process): what the store costs the
runner's p99.

Targets (issues 3 and 15), serial at 100 devices: p99 under 2 ms, and at most 1.5x the
observer's p99 measured in the same run. At 100 devices every serial variant runs in
``TARGET_ROUNDS`` interleaved rounds (runner, observer, queued, no store; again), and each
variant's stops are pooled: on a shared machine one 8-second window of one variant could
fall in a burst of other work the next variant's window missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from bench.phases import boot_delays_s
from bench.report import describe_machine, print_table
from devicebridge.app import event_loop_first, freeze_start_up
from devicebridge.clock import SystemClock
from devicebridge.core.engine import DecisionKind
from devicebridge.core.policy import SafetyPolicy, default_policy
from devicebridge.core.reassembly import TelemetryGap, TelemetryItem
from devicebridge.core.routine import parse_routine
from devicebridge.device.session import DeviceSession, MassagerSession
from devicebridge.device.transport.base import LinkLostReceiver, MalformedReceiver, MessageReceiver
from devicebridge.device.transport.ble import BleBackends, BleTransport, scan
from devicebridge.device.transport.serial import SerialTransport
from devicebridge.errors import DeviceBridgeError
from devicebridge.run.runner import RoutineRunner, RunMode
from devicebridge.storage.sessions import SessionStore
from devicebridge.storage.writer import StoreWriter
from protocols import Command, MessageType, Opcode, StopAll, TelemetryBatch, Zone
from protocols.telemetry import BATCH_HEADER, MASSAGER_SAMPLE_DTYPE
from simulators import HandScript, HandSegment, SimulatedWorld, VirtualClock
from simulators.devices.link import Channel
from simulators.links.serial_port import PtySerialPort

DEVICE_COUNTS: Final = (1, 10, 100)
MEASURE_S: Final = float(os.environ.get("BENCH_LATENCY_S", "8"))
# At the target's device count the variants run in this many interleaved rounds, their
# stops pooled (as one window of ROUNDS x MEASURE_S): a burst of other work on a shared
# machine then falls on every variant alike, not on whichever ran while it lasted.
TARGET_ROUNDS: Final = int(os.environ.get("BENCH_LATENCY_ROUNDS", "3"))
BATCH_INTERVAL_S: Final = 0.1
TARGET_P99_MS: Final = 2.0
TARGET_X_OBSERVER: Final = 1.5
TARGET_DEVICES: Final = 100
CHEEK_CAP_KPA: Final = 15.0
IN_BAND_KPA: Final = 7.0
TOO_HIGH_KPA: Final = 20.0
SCAN_S: Final = 1.0
SETTLE_S: Final = 1.0  # wall seconds of running before the window opens
SEED: Final = 99
MS_PER_S: Final = 1000.0
SAMPLE_BYTES: Final = MASSAGER_SAMPLE_DTYPE.itemsize
VARIANTS: Final = ("runner", "observer", "queued")
# Serial only, a diagnostic beside the baselines: the same runner with no session store
# (nothing written, no writer's process, no record at a session's start or end), to show how
# much of the runner's p99 the store costs the loop. Not a target's baseline.
UNSTORED: Final = "runner, no store"

ROUTINE = """
[routine]
name = "latency bench"
author = "bench"
version = "1"
device_kind = "massager"
category = "drainage"
""" + "".join(
    f"""
[[steps]]
zone = "{zone}"
contact_time_s = 60
mode = "vibration"
intensity = 4
pressure_kpa = {{ min = 4.0, max = 12.0 }}
"""
    for zone in ("cheek_left", "cheek_right", "cheek_left", "cheek_right")
)


def now_s() -> float:
    """CLOCK_MONOTONIC: one time line for the bench and the device process."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def hand() -> HandScript:
    """Every second: 0.6 s in band, 0.2 s above the cheek cap, 0.2 s lifted."""
    return HandScript(
        [
            HandSegment(0.005, 0.6, Zone.CHEEK_LEFT, IN_BAND_KPA),
            HandSegment(0.605, 0.2, Zone.CHEEK_LEFT, TOO_HIGH_KPA),
        ],
        loop=True,
        period_s=1.0,
    )


def _telemetry_span(data: bytes) -> tuple[int, int]:
    _, _, first, _ = BATCH_HEADER.unpack_from(data)
    return first, (len(data) - BATCH_HEADER.size) // SAMPLE_BYTES


# --------------------------------------------------------------------------- device process


class StampedPort(PtySerialPort):
    """Stamps every telemetry frame as it goes into the pty (the sample reaches the host)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stamps: list[tuple[int, int, float]] = []

    def send(self, channel: Channel, message: bytes) -> None:
        super().send(channel, message)
        if message and message[0] == MessageType.TELEMETRY:
            first, count = _telemetry_span(message)
            self.stamps.append((first, count, now_s()))


async def _serve(count: int) -> None:
    """Devices on ptys until SIGTERM; then their frame stamps as JSON on stdout."""
    clock = VirtualClock(realtime=True)
    world = SimulatedWorld(seed=SEED, clock=clock)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ports: list[StampedPort] = []
    async with world:
        clock.start()
        for delay_s in boot_delays_s(count, BATCH_INTERVAL_S, SEED):
            await clock.sleep(delay_s)
            port = StampedPort(world.add_massager(hand=hand()))
            await port.start()
            ports.append(port)
            print(port.path, flush=True)
        await stop.wait()
        await clock.stop()
        for port in ports:
            await port.stop()
    print(json.dumps({port.path: port.stamps for port in ports}), flush=True)


# --------------------------------------------------------------------------- bridge side


@dataclass
class Stop:
    """One measured safety stop: the sample that triggered it and when STOP_ALL went out."""

    device: str
    sequence: int
    read_s: float  # the bridge got the frame (read / notification callback)
    written_s: float  # STOP_ALL written (serial) / entering the write (BLE)


@dataclass
class Probe:
    """Arrival stamps of one device's telemetry and the stops measured on it."""

    device: str
    arrivals: deque[tuple[int, int, float, bool]] = field(default_factory=lambda: deque(maxlen=64))
    stops: list[Stop] = field(default_factory=list)
    trigger: Callable[[], int | None] | None = None  # the sequence the next STOP_ALL is for
    watching: Callable[[], bool] = lambda: True  # a routine's engine watches the stream
    unwatched: int = 0  # stops for samples that came while no engine watched (not measured)

    def arrived(self, data: bytes, stamp_s: float) -> None:
        if data and data[0] == MessageType.TELEMETRY:
            first, count = _telemetry_span(data)
            self.arrivals.append((first, count, stamp_s, self.watching()))

    def stop_written(self, data: bytes, stamp_s: float) -> None:
        if self.trigger is None or Command.decode(data).opcode != Opcode.STOP_ALL:
            return
        sequence = self.trigger()
        if sequence is None:
            return
        for first, count, read_s, watching in self.arrivals:
            if first <= sequence < first + count:
                if watching:
                    self.stops.append(Stop(self.device, sequence, read_s, stamp_s))
                else:
                    self.unwatched += 1
                return


class TimedSerialTransport(SerialTransport):
    def __init__(self, port: str, probe: Probe) -> None:
        super().__init__(port, SystemClock())
        self.probe = probe
        self._read_s = 0.0

    def set_receivers(
        self,
        on_message: MessageReceiver,
        on_link_lost: LinkLostReceiver,
        on_malformed: MalformedReceiver | None = None,
    ) -> None:
        def stamped(data: bytes) -> None:
            self.probe.arrived(data, self._read_s)
            on_message(data)

        super().set_receivers(stamped, on_link_lost, on_malformed)

    def _on_readable(self) -> None:
        self._read_s = now_s()
        super()._on_readable()

    def write_control_nowait(self, data: bytes) -> None:
        super().write_control_nowait(data)
        self.probe.stop_written(data, now_s())

    async def write_control(self, data: bytes) -> None:
        await super().write_control(data)
        self.probe.stop_written(data, now_s())


class TimedBleTransport(BleTransport):
    def __init__(self, *args: object, probe: Probe, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.probe = probe

    def _on_notification(self, char: object, data: bytearray) -> None:
        self.probe.arrived(bytes(data), now_s())
        super()._on_notification(char, data)  # type: ignore[arg-type]

    async def write_control(self, data: bytes) -> None:
        self.probe.stop_written(data, now_s())
        await super().write_control(data)


# ------------------------------------------------------------------ what runs on each device

Until = Callable[[], bool]


async def _runner_loop(
    session: DeviceSession,
    probe: Probe,
    store: SessionStore | None,
    writer: StoreWriter | None,
    policy: SafetyPolicy,
    until: Until,
) -> None:
    # The shipped policy: every over-cap event pauses (STOP_ALL written at once, which is
    # what is measured) and the policy's count of them ends the session; a new run starts.
    routine = parse_routine(ROUTINE, policy, label="bench")
    while not until():
        runner = RoutineRunner(
            session, routine, policy, store=store, writer=writer, mode=RunMode.HOST
        )
        measured: set[int] = set()

        def trigger(runner: RoutineRunner = runner, measured: set[int] = measured) -> int | None:
            engine = runner.engine
            if engine is None:
                return None
            for decision in reversed(engine.decisions):
                if decision.kind in (DecisionKind.PAUSE, DecisionKind.STOP):
                    if decision.sequence is None or decision.sequence in measured:
                        return None  # the final STOP_ALL of a run, not a safety stop
                    measured.add(decision.sequence)
                    return decision.sequence
            return None

        def watching(runner: RoutineRunner = runner) -> bool:
            # While the run drives the device: from its start (record stored, engine
            # started) to its end. Before it, the previous run's final STOP_ALL has
            # stopped the device and this one has commanded nothing yet.
            return runner.judging

        probe.trigger, probe.watching = trigger, watching
        await runner.run()
    probe.trigger, probe.watching = None, lambda: True


def _over_cap(batch: TelemetryBatch, above: bool) -> tuple[int | None, bool]:
    """The first sample of a new excursion above the cap, and whether the batch ends above."""
    pressure = batch.samples["pressure_dapa"]
    over = np.flatnonzero(pressure > round(CHEEK_CAP_KPA * 100))
    first = batch.first_sequence + int(over[0]) if over.size and not above else None
    return first, bool(over.size) and bool(pressure[-1] > round(CHEEK_CAP_KPA * 100))


async def _observer_loop(session: DeviceSession, probe: Probe, until: Until) -> None:
    state = {"above": False}
    pending: list[int] = []

    def observe(item: TelemetryItem) -> None:
        if isinstance(item, TelemetryGap):
            return
        first, state["above"] = _over_cap(item, state["above"])
        if first is not None:
            pending.append(first)
            with contextlib.suppress(DeviceBridgeError):
                session.send_soon(StopAll()).add_done_callback(_quiet)

    probe.trigger = lambda: pending.pop() if pending else None
    remove = session.observe_telemetry(observe)
    del until  # the observer works inside the session's callbacks: wait to be cancelled
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        remove()
        probe.trigger = None


def _quiet(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()


async def _queued_loop(session: DeviceSession, probe: Probe, until: Until) -> None:
    subscription = session.telemetry()
    above = False
    pending: list[int] = []
    probe.trigger = lambda: pending.pop() if pending else None
    try:
        async for item in subscription:
            if until():
                break
            if isinstance(item, TelemetryGap):
                continue
            first, above = _over_cap(item, above)
            if first is not None:
                pending.append(first)
                with contextlib.suppress(DeviceBridgeError):
                    await session.send(StopAll())
    finally:
        probe.trigger = None
        await subscription.aclose()


async def _drive(
    pairs: list[tuple[DeviceSession, Probe]], variant: str, store_folder: Path
) -> None:
    """Run ``variant`` on every device; measure MEASURE_S wall seconds of steady state.

    Wall time on purpose: the window is real time. The window opens after every device
    runs its variant (100 runners starting in the same instant are not a steady state).
    """
    deadline_s = float("inf")

    def until() -> bool:
        return now_s() >= deadline_s

    # One policy for every device, as ``devicebridge serve`` has; then what start-up made
    # is frozen, as serve does once its devices are connected (every variant alike).
    policy = default_policy()
    freeze_start_up()
    store = SessionStore(store_folder / "bench.sqlite3")
    # One store writer for every run, as ``devicebridge serve`` gives its runners.
    writer = StoreWriter(store)
    tasks: list[Awaitable[None]]
    if variant == "runner":
        tasks = [_runner_loop(s, p, store, writer, policy, until) for s, p in pairs]
    elif variant == UNSTORED:
        tasks = [_runner_loop(s, p, None, None, policy, until) for s, p in pairs]
    elif variant == "observer":
        tasks = [_observer_loop(s, p, until) for s, p in pairs]
    else:
        tasks = [_queued_loop(s, p, until) for s, p in pairs]
    runs = [asyncio.ensure_future(task) for task in tasks]
    await asyncio.sleep(SETTLE_S)
    for _, probe in pairs:
        probe.stops.clear()
        probe.unwatched = 0
    deadline_s = now_s() + MEASURE_S
    await asyncio.sleep(MEASURE_S)
    measured = {id(probe): (list(probe.stops), probe.unwatched) for _, probe in pairs}
    for run in runs:
        run.cancel()
    ended = await asyncio.gather(*runs, return_exceptions=True)
    failed = [e for e in ended if isinstance(e, Exception)]
    if failed:  # a device that stopped running routines would quietly lighten the load
        raise RuntimeError(f"{len(failed)} device loops ended early: {failed[0]!r}")
    for _, probe in pairs:
        probe.stops[:], probe.unwatched = measured[id(probe)]  # not those of the shutdown
    writer.close()
    store.close()


@dataclass
class Result:
    latencies_s: list[float]  # from where the sample reaches the bridge
    bridge_s: list[float] = field(default_factory=list)  # serial: from the bridge's read
    unwatched: int = 0  # stops for samples that came between two runs (not measured)

    def add(self, other: Result) -> None:
        """Pool ``other``'s stops (another window of the same case) with these."""
        self.latencies_s += other.latencies_s
        self.bridge_s += other.bridge_s
        self.unwatched += other.unwatched


async def _measure_serial(count: int, variant: str) -> Result:
    """Device write -> STOP written, and bridge read -> STOP written."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.bench_latency",
        "serve",
        str(count),
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        paths = [(await child.stdout.readline()).decode().strip() for _ in range(count)]
        pairs: list[tuple[DeviceSession, Probe]] = []
        rng = random.Random(SEED)
        for path in paths:
            probe = Probe(path)
            transport = TimedSerialTransport(path, probe)
            session = MassagerSession(
                transport, SystemClock(), rng=random.Random(rng.random()), name=path
            )
            pairs.append((session, probe))
        await asyncio.gather(*(session.start() for session, _ in pairs))
        with tempfile.TemporaryDirectory() as folder:
            await _drive(pairs, variant, Path(folder))
        for opened, _ in pairs:
            await opened.close()
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
        out, _ = await child.communicate()
    stamps: dict[str, list[list[float]]] = json.loads(out.decode().strip().splitlines()[-1])
    total, bridge = [], []
    for _, probe in pairs:
        sent = stamps[probe.device]
        for stop in probe.stops:
            for first, samples, sent_s in sent:
                if first <= stop.sequence < first + samples:
                    total.append(stop.written_s - sent_s)
                    bridge.append(stop.written_s - stop.read_s)
                    break
    return Result(total, bridge, sum(probe.unwatched for _, probe in pairs))


async def _measure_ble(count: int, variant: str) -> Result:
    clock = VirtualClock(realtime=True)
    world = SimulatedWorld(seed=SEED, clock=clock)
    async with world:
        clock.start()
        for delay_s in boot_delays_s(count, BATCH_INTERVAL_S, SEED):
            await clock.sleep(delay_s)
            world.add_massager(hand=hand())
        backends = BleBackends(world.scanner_backend, world.client_backend)
        found = await scan(clock, SCAN_S, backends.scanner)
        rng = random.Random(SEED)
        pairs: list[tuple[DeviceSession, Probe]] = []
        for device in found:
            probe = Probe(device.address)
            transport = TimedBleTransport(clock, device=device, backends=backends, probe=probe)
            session = MassagerSession(transport, clock, rng=random.Random(rng.random()))
            pairs.append((session, probe))
        await asyncio.gather(*(session.start() for session, _ in pairs))
        with tempfile.TemporaryDirectory() as folder:
            await _drive(pairs, variant, Path(folder))
        for opened, _ in pairs:
            await opened.close()
        await clock.stop()
    return Result(
        [stop.written_s - stop.read_s for _, probe in pairs for stop in probe.stops],
        unwatched=sum(probe.unwatched for _, probe in pairs),
    )


# --------------------------------------------------------------------------- report


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * MS_PER_S if values else float("nan")


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b == b and b > 0 else float("nan")


def run() -> bool:
    met = True
    serial_rows, ble_rows = [], []
    for count in DEVICE_COUNTS:
        # Every variant in the process the way every devicebridge command runs (App).
        rounds = TARGET_ROUNDS if count == TARGET_DEVICES else 1
        serial: dict[str, Result] = {}
        with event_loop_first():
            for _ in range(rounds):  # interleaved: each round runs every variant once
                for variant in (*VARIANTS, UNSTORED):
                    result = asyncio.run(_measure_serial(count, variant))
                    if variant in serial:
                        serial[variant].add(result)
                    else:
                        serial[variant] = result
        full = serial["runner"]
        p99 = _ms(full.latencies_s, 99)
        observer, queued = (
            _ms(serial["observer"].latencies_s, 99),
            _ms(serial["queued"].latencies_s, 99),
        )
        verdict = "-"
        if count == TARGET_DEVICES:
            under = bool(full.latencies_s) and p99 < TARGET_P99_MS
            near = bool(full.latencies_s) and p99 <= TARGET_X_OBSERVER * observer
            met = met and under and near
            verdict = (
                f"< {TARGET_P99_MS:g} ms {'met' if under else 'MISSED'}, "
                f"<= {TARGET_X_OBSERVER:g}x observer {'met' if near else 'MISSED'}"
            )
        serial_rows.append(
            [
                count,
                len(full.latencies_s),
                full.unwatched,
                round(_ms(full.latencies_s, 50), 3),
                round(p99, 3),
                round(_ms(full.latencies_s, 100), 3),
                round(_ms(full.bridge_s, 99), 3),
                round(_ms(serial[UNSTORED].latencies_s, 99), 3),
                round(observer, 3),
                round(queued, 3),
                _ratio(p99, observer),
                _ratio(p99, queued),
                verdict,
            ]
        )
        with event_loop_first():
            ble = {v: asyncio.run(_measure_ble(count, v)) for v in VARIANTS}
        full = ble["runner"]
        p99 = _ms(full.latencies_s, 99)
        observer, queued = _ms(ble["observer"].latencies_s, 99), _ms(ble["queued"].latencies_s, 99)
        ble_rows.append(
            [
                count,
                len(full.latencies_s),
                full.unwatched,
                round(_ms(full.latencies_s, 50), 3),
                round(p99, 3),
                round(_ms(full.latencies_s, 100), 3),
                round(observer, 3),
                round(queued, 3),
                _ratio(p99, observer),
                _ratio(p99, queued),
            ]
        )
    common = ["devices", "stops", "between runs", "p50 ms", "p99 ms", "max ms"]
    print_table(
        f"Safety-stop latency, serial, devices in another process: device's frame written -> "
        f"STOP_ALL written ({MEASURE_S:g} s per case; at {TARGET_DEVICES} devices "
        f"{TARGET_ROUNDS} interleaved rounds of every variant, stops pooled; 100 Hz per device, "
        f"shipped policy, random boot phases; targets at {TARGET_DEVICES} devices: p99 < "
        f"{TARGET_P99_MS:g} ms and <= {TARGET_X_OBSERVER:g}x the observer's p99)",
        [
            *common,
            "read-> p99",
            "no store p99",
            "observer p99",
            "queued p99",
            "p99/observer",
            "p99/queued",
            "target",
        ],
        serial_rows,
    )
    print_table(
        "Safety-stop latency, BLE, devices in the bridge's process: notification -> "
        "STOP_ALL write (simulator work shares the loop; for comparison)",
        [*common, "observer p99", "queued p99", "p99/observer", "p99/queued"],
        ble_rows,
    )
    print(
        "no store p99: the serial runner's p99 with no session store (nothing written, no "
        "writer's process): a diagnostic of the store's share, not a baseline of the targets."
    )
    print(
        "between runs: stops for samples that arrived while no engine watched (a run was "
        "ending or starting; the previous run's STOP_ALL had already stopped the device); "
        "not in the percentiles."
    )
    print(describe_machine())
    print(f"latency target {'met' if met else 'MISSED'}")
    return met


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"] or len(sys.argv) != 3:
        sys.exit("usage: python -m bench.bench_latency serve DEVICES")
    asyncio.run(_serve(int(sys.argv[2])))
