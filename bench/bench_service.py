"""The whole service end to end: simulated massagers -> bleak API -> sessions -> service
(recorder, SQLite session store, batching, outbox) -> a private Mosquitto -> a subscriber
in another process, against two baselines measured in the same run (:mod:`bench.floor`).

Massagers stream at 100 Hz on a realtime virtual clock for ``DURATION_S`` wall seconds, in
a process of their own for each run (:class:`Devices`), reached through the real bleak API
over :mod:`bench.ble_proxy`: the bench's process runs only the host, so the simulator's
cost is in none of the figures (in the same process it was not a constant to subtract: it
falls per sample as a busier host lets it generate in larger steps, which made the
100-device rows' own costs negative).

The devices boot at random phases within one notification interval, as independent radios
do (:mod:`bench.phases`). Booted at one instant, they sent their notifications in one burst
per interval, which the host's loop takes several to a wake-up, the cheapest pattern there
is; and not the same for every case: the bridge's routines run as device programs, which
spread the devices' sends over the interval, so the routine case paid for a pattern that
the floor's cases never saw (600 loop wake-ups a second against 180 at 100 devices).

Five cases per device count, interleaved ``REPEATS`` times (each row shows its median run:
these machines are shared, and one noisy window must not decide a verdict):

* ``bare``: the same devices through the same bleak proxy, a callback that only counts;
* ``floor, stream``: a minimal script doing the streaming service's work (decode with
  numpy, one JSON message per device per second to the broker at QoS 1);
* ``floor, record``: the same plus the routine's work (compare with the cap, batched
  SQLite writes every 0.25 s);
* the bridge streaming to MQTT only, and the bridge with a routine on every device.

Columns: ``whole`` is the bench process's CPU per sample (the host: bleak's proxy client,
and the bridge or the floor script); ``own`` is the whole minus bare's (the cost per
sample of the bridge or of the floor script); ``devices CPU`` the devices' process's, in no
other figure: the machine's other load, which is not the same in every case (massagers
driven by a routine, their motors and hands at work, took three times the CPU of the
streaming ones in the first runs of this column: 0.18-0.21 s/s against 0.05-0.08 at 100
devices), and two cores share it with the host;
``x floor`` is the bridge's own over the floor's own; ``MQTT msgs/s`` the messages each
published in the window (the floor's are the telemetry alone; the bridge's telemetry
messages also carry the devices' contact and zone events, and it publishes the devices'
states, their other events and, with a routine, the engine's decisions, each a message of
its own at the same QoS: work the floor does not do, in the bridge's own cost). Targets
(issue 15): at most 1.5x the floor with a routine on each of 100 devices, at most 1.2x
streaming only. Also kept from issue 4: 100 devices at 100 samples/s on time, on one
core, with no loss (checked on the bridge's paths), and the bridge's own cost at least
10x below what one BLE radio delivers.

A second table takes the MQTT messages apart from the rest: what one telemetry message
costs the process, published at a steady rate until acknowledged, the floor's way
(:func:`bench.floor.messages`) and the bridge's (batcher, publisher, outbox and link of a
running :class:`BridgeService`); with the messages each published per second at 100
devices in the first table, it tells how much of the bridge's own cost over the floor's is
its extra messages (states, events, decisions) rather than a dearer message.

A third table says where each case's CPU goes at 100 devices: every case once more, apart
from the runs the ratios come from, with every event-loop callback timed on the thread's
CPU clock (:class:`bench.loop_cpu.LoopCpu`), by what it ran: the devices' frames (the bleak
proxy's reader, which runs the notification callback: the bare count, the floor's decode,
the bridge's transport, session, runner and batcher), the MQTT client's socket work, the
publisher, the store; what the process spent outside callbacks; the store writer's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from bench import ble_proxy, floor
from bench.loop_cpu import LoopCpu
from bench.phases import boot_delays_s
from bench.report import describe_machine, print_table
from devicebridge.clock import SystemClock
from devicebridge.core.policy import default_policy
from devicebridge.core.routine import parse_routine
from devicebridge.device.session import DeviceSession, session_class_for
from devicebridge.device.transport.ble import BleBackends, BleTransport
from devicebridge.integrations.mqtt import MqttSettings
from devicebridge.service.supervisor import BridgeService
from devicebridge.service.telemetry import TelemetryBatcher
from devicebridge.storage.children import process_cpu_s
from devicebridge.storage.registry import PairedDevice
from devicebridge.storage.writer import writer_cpu_s
from protocols import DeviceKind, SampleFormat, TelemetryBatch
from protocols.telemetry import MASSAGER_SAMPLE_DTYPE
from simulators import SimulatedWorld, VirtualClock
from simulators.devices.device import DEFAULT_BATCH_INTERVAL_S

DEVICE_COUNTS: Final = (10, 100)
DURATION_S: Final = float(os.environ.get("BENCH_SERVICE_S", "5"))
REPEATS: Final = int(os.environ.get("BENCH_SERVICE_REPEATS", "5"))
ROUTINE_SETTLE_S: Final = 1.0
DEVICES_SEED: Final = 11
# The per-message table: telemetry messages of one second at 100 Hz, 15 every 0.1 s (the
# rate of the bridge's messages at 100 devices, events included), interleaved repeats.
MESSAGE_COUNT: Final = int(os.environ.get("BENCH_SERVICE_MESSAGES", "1000"))
MESSAGES_PER_TICK: Final = 15
MESSAGE_TICK_S: Final = 0.1
MESSAGE_REPEATS: Final = 5
SAMPLE_RATE_HZ: Final = 100
BYTES_PER_SAMPLE: Final = 9
BLE_RADIO_BITS_PER_S: Final = 1.4e6
TARGET_RADIO_RATIO: Final = 10.0
TARGET_DEVICES: Final = 100
TARGET_STREAM_X_FLOOR: Final = 1.2
TARGET_ROUTINE_X_FLOOR: Final = 1.5
BARE: Final = "bare: bleak proxy + counting callback"
FLOOR_STREAM: Final = "floor, stream (minimal script)"
STREAM: Final = "bridge: stream to MQTT"
FLOOR_RECORD: Final = "floor, record (minimal script)"
ROUTINE_CASE: Final = "bridge: + routine recorded"
CASES: Final = (BARE, FLOOR_STREAM, STREAM, FLOOR_RECORD, ROUTINE_CASE)
# The table of where the host's CPU goes: its largest kinds of callback, then the rest.
WHERE_ROWS: Final = 8
SHORT_NAMES: Final = {
    BARE: "bare",
    FLOOR_STREAM: "floor stream",
    STREAM: "bridge stream",
    FLOOR_RECORD: "floor record",
    ROUTINE_CASE: "bridge routine",
}
OUTSIDE_CALLBACKS: Final = "outside callbacks (the loop's polling, other threads)"
WRITER_PROCESS: Final = "the store writer's process"
WHOLE: Final = "whole (process CPU + writer)"
FLOOR_MESSAGES: Final = "floor: aiomqtt publish, QoS 1"
BRIDGE_MESSAGES: Final = "bridge: batcher, publisher, outbox, link"
BRIDGE: Final = "bench"
# The starter drainage routine: its category has no frequency limit. The devices of one
# bridge are one person's, and admission counts every run from its admission, so a routine
# limited to a few sessions a week (firming: 2 in 7 days) is refused on all but the first
# devices started together.
ROUTINE: Final = (
    Path(__file__).resolve().parents[1] / "devicebridge/data/routines/lymphatic_drainage.toml"
)

SUBSCRIBER = r"""
import asyncio, json, sys
import aiomqtt

async def main(port):
    totals, messages, ordered = {}, 0, True
    last = {}
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe("devicebridge/v1/bench/devices/+/telemetry", qos=1)
        print("ready", flush=True)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def answer():
            while await reader.readline():
                print(json.dumps({"samples": sum(totals.values()), "messages": messages,
                                  "ordered": ordered}), flush=True)
        answering = asyncio.create_task(answer())
        async for m in client.messages:
            body = json.loads(m.payload)
            serial = body["serial"]
            if serial in last and body["first_sequence"] != last[serial]:
                ordered = False
            last[serial] = body["first_sequence"] + body["count"]
            totals[serial] = totals.get(serial, 0) + body["count"]
            messages += 1

asyncio.run(main(int(sys.argv[1])))
"""


class Broker:
    def __init__(self, workdir: Path) -> None:
        from tests.broker import free_port

        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\n"
        )
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, binary: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(self.config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.02)  # readiness polling
        raise RuntimeError("mosquitto did not start")

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await self.process.wait()


class Devices:
    """The simulated massagers of one run, in a process of their own
    (``python -m bench.bench_service devices N``), reached through the real bleak API over
    :mod:`bench.ble_proxy`: the bench process is the host alone, so its CPU is the host's
    (the simulator's cost, which shrinks per sample as a busier host lets it generate in
    larger steps, is not in it to be subtracted)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.process: asyncio.subprocess.Process | None = None
        self.backends = BleBackends()
        self.paired: list[PairedDevice] = []

    async def __aenter__(self) -> Devices:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.bench_service",
            "devices",
            str(self.count),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        served = json.loads(await self.process.stdout.readline())
        self.backends = BleBackends(*ble_proxy.bind((ble_proxy.LOCALHOST, served["port"])))
        self.paired = [
            PairedDevice(name, serial, "massager", "sim", "ble", address)
            for name, serial, address in served["devices"]
        ]
        return self

    def cpu_s(self) -> float:
        """CPU seconds the devices' process has used so far."""
        return 0.0 if self.process is None else process_cpu_s(self.process.pid)

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.close()  # the device process ends when its stdin does
        await self.process.wait()


async def _serve_devices(count: int) -> None:
    """The device process: ``count`` massagers on a realtime clock, booted at random phases
    within one batch interval (:mod:`bench.phases`), until stdin closes."""
    clock = VirtualClock(realtime=True)
    world = SimulatedWorld(seed=DEVICES_SEED, clock=clock)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with world:
        clock.start()
        massagers = []
        for delay_s in boot_delays_s(count, DEFAULT_BATCH_INTERVAL_S, DEVICES_SEED):
            await clock.sleep(delay_s)
            massagers.append(world.add_massager())
        server = await ble_proxy.serve(world.scanner_backend, world.client_backend)
        devices = [[m.name, m.serial_number, m.address] for m in massagers]
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"port": port, "devices": devices}), flush=True)
        await stdin.read()
        server.close()
        await clock.stop()


def _session(
    backends: BleBackends, device: PairedDevice, rng: random.Random, clock: SystemClock
) -> DeviceSession:
    transport = BleTransport(
        clock,
        serial_number=device.serial_number,
        address=device.last_address,
        backends=backends,
    )
    cls = session_class_for(DeviceKind.MASSAGER)
    return cls(transport, clock, rng=random.Random(rng.random()), name=device.name)


async def _bare(count: int, during: LoopCpu | None = None) -> dict[str, float]:
    """bleak delivering the notifications, a callback that only counts the samples."""
    async with Devices(count) as devices:
        addresses = [d.last_address or "" for d in devices.paired]
        measured = await floor.bare(devices.backends, addresses, DURATION_S, devices.cpu_s, during)
    return {
        "cpu_s": measured.cpu_s,
        "wall_s": measured.wall_s,
        "samples": measured.samples,
        "devices_cpu_s": measured.extra["devices_cpu_s"],
    }


async def _floor(
    count: int, broker: Broker, data_dir: Path, *, record: bool, during: LoopCpu | None = None
) -> dict[str, float]:
    async with Devices(count) as devices:
        measured = await floor.floor(
            devices.backends,
            [(d.last_address or "", d.serial_number) for d in devices.paired],
            broker.port,
            data_dir,
            record=record,
            duration_s=DURATION_S,
            devices_cpu_s=devices.cpu_s,
            during=during,
        )
    return {
        "cpu_s": measured.cpu_s,
        "wall_s": measured.wall_s,
        "samples": measured.samples,
        "messages": measured.extra["messages"],
        "devices_cpu_s": measured.extra["devices_cpu_s"],
    }


async def _service(
    count: int,
    broker: Broker,
    data_dir: Path,
    *,
    with_routine: bool,
    during: LoopCpu | None = None,
) -> dict[str, Any]:
    rng = random.Random(1)
    clock = SystemClock()
    subscriber = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SUBSCRIBER,
        str(broker.port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert subscriber.stdout is not None
    assert subscriber.stdin is not None
    assert await subscriber.stdout.readline() == b"ready\n"
    routine = parse_routine(ROUTINE.read_text(), default_policy())
    async with Devices(count) as simulated:
        devices = simulated.paired
        service = BridgeService(
            bridge_id=BRIDGE,
            data_dir=data_dir,
            policy=default_policy(),
            clock=clock,
            devices=devices,
            session_factory=lambda p: _session(simulated.backends, p, rng, clock),
            mqtt=MqttSettings("127.0.0.1", broker.port),
            rng=rng,
        )
        task = asyncio.create_task(service.run())
        await service.wait_started()
        while not all(w.batcher is not None for w in service.workers.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # waiting for every device to connect
        for device in devices if with_routine else ():
            await service.start_routine(device.serial_number, routine)
        if with_routine:
            # Measure the routines running, not their start (configuring 100 devices, the
            # first guidance): a one-off that a 5 s window would charge to every sample.
            while not all(w.runner is not None for w in service.workers.values()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # waiting for every routine to start
            await asyncio.sleep(ROUTINE_SETTLE_S)  # its first commands and guidance
        # The store writer's process works for the bridge: its CPU is the bridge's.
        cpu0, writer0, wall0 = time.process_time(), writer_cpu_s(), time.perf_counter()
        devices_cpu0 = simulated.cpu_s()
        received0 = sum(w.samples_received for w in service.workers.values())
        assert service.outbox is not None
        messages0 = service.outbox.next_sequence()  # every message the bridge publishes
        with during or contextlib.nullcontext():
            await asyncio.sleep(DURATION_S)  # measuring a realtime stream
        writer_s = writer_cpu_s() - writer0
        cpu = time.process_time() - cpu0 + writer_s
        wall = time.perf_counter() - wall0
        devices_cpu = simulated.cpu_s() - devices_cpu0
        measured = sum(w.samples_received for w in service.workers.values()) - received0
        messages = service.outbox.next_sequence() - messages0
        lost_on_links = sum(w.session.stats.lost_samples for w in service.workers.values())
        service.request_stop()
        await task
        expected = sum(
            (w.batcher.samples_published if w.batcher else 0) for w in service.workers.values()
        )
        recorded = sum(w.samples_received for w in service.workers.values())
    report: dict[str, Any] = {}
    for _ in range(200):
        subscriber.stdin.write(b"?\n")
        await subscriber.stdin.drain()
        report = json.loads(await subscriber.stdout.readline())
        if report["samples"] >= expected:
            break
        await asyncio.sleep(0.05)  # the last messages are on their way
    subscriber.kill()
    await subscriber.wait()
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "samples": measured,
        "messages": messages,
        "expected": expected,
        "recorded": recorded,
        "received": report["samples"],
        "ordered": report["ordered"],
        "lost_on_links": lost_on_links,
        "devices_cpu_s": devices_cpu,
        "writer_cpu_s": writer_s,
    }


async def _where_cpu_goes(broker: Broker, workdir: Path) -> dict[str, dict[str, float]]:
    """Each case once more at ``TARGET_DEVICES`` devices with a :class:`LoopCpu` over its
    window: the host's CPU per sample (seconds) by what the loop ran, what it spent outside
    callbacks, and the bridge's store writer's process."""
    cases: dict[str, dict[str, float]] = {}
    for case in CASES:
        loop_cpu = LoopCpu()
        folder = workdir / f"where-{len(cases)}"
        if case == BARE:
            run = await _bare(TARGET_DEVICES, loop_cpu)
        elif case in (FLOOR_STREAM, FLOOR_RECORD):
            record = case == FLOOR_RECORD
            run = await _floor(TARGET_DEVICES, broker, folder, record=record, during=loop_cpu)
        else:
            routine = case == ROUTINE_CASE
            run = await _service(
                TARGET_DEVICES, broker, folder, with_routine=routine, during=loop_cpu
            )
        samples = run["samples"]
        parts = {label: cpu_s / samples for label, cpu_s in loop_cpu.cpu_s.items()}
        writer_s = run.get("writer_cpu_s", 0.0)
        process_s = run["cpu_s"] - writer_s
        parts[OUTSIDE_CALLBACKS] = (process_s - sum(loop_cpu.cpu_s.values())) / samples
        parts[WRITER_PROCESS] = writer_s / samples
        parts[WHOLE] = run["cpu_s"] / samples
        cases[case] = parts
    return cases


def _print_where_cpu_goes(cases: dict[str, dict[str, float]]) -> None:
    if not cases:
        return
    fixed = (OUTSIDE_CALLBACKS, WRITER_PROCESS, WHOLE)
    labels = {label for parts in cases.values() for label in parts if label not in fixed}
    largest = sorted(labels, key=lambda label: -max(p.get(label, 0.0) for p in cases.values()))
    rest = largest[WHERE_ROWS:]

    def row(name: str, labels: Sequence[str]) -> tuple[object, ...]:
        return (name, *(_us(sum(p.get(label, 0.0) for label in labels)) for p in cases.values()))

    rows = [row(label, (label,)) for label in largest[:WHERE_ROWS]]
    rows.append(row(f"{len(rest)} other kinds of callback", rest))
    rows += [row(label, (label,)) for label in fixed]
    print_table(
        f"where the host's CPU goes, us/sample, {TARGET_DEVICES} devices: each case once more"
        " (not in the figures above), every event-loop callback timed with the thread's CPU"
        " clock (bench/loop_cpu.py; its two clock reads per callback are in these figures);"
        " task X = the steps of the task running X. The devices' frames arrive in"
        " `task _Connection._read` (the bleak proxy's reader, which runs the notification"
        " callback: the bare count, the floor's decode, or the bridge's transport, session,"
        " runner and batcher); the MQTT client's socket work is in paho's callbacks",
        ["what the loop ran", *(SHORT_NAMES[case] for case in cases)],
        rows,
    )


async def _bridge_messages(broker: Broker, data_dir: Path, sample_bytes: bytes) -> float:
    """Process CPU seconds for ``MESSAGE_COUNT`` telemetry messages through a running
    service with no devices (a device worker's batcher, the service's publisher, outbox
    and link), until the broker acknowledged them all."""
    rng = random.Random(1)
    clock = SystemClock()
    service = BridgeService(
        bridge_id=BRIDGE,
        data_dir=data_dir,
        policy=default_policy(),
        clock=clock,
        devices=[],
        session_factory=lambda p: _session(BleBackends(), p, rng, clock),
        mqtt=MqttSettings("127.0.0.1", broker.port),
        rng=rng,
    )
    task = asyncio.create_task(service.run())
    await service.wait_started()
    assert service.link is not None
    await service.link.wait_connected()
    serial = "MESSAGES"
    batcher = TelemetryBatcher(serial, SampleFormat.MASSAGER_V1, SAMPLE_RATE_HZ, 1.0)
    topic = service.topics.telemetry(serial)
    samples = np.frombuffer(sample_bytes, MASSAGER_SAMPLE_DTYPE)
    next_sequence = 0
    published0 = service.link.published

    def send() -> None:  # what DeviceWorker._publish_telemetry does with a batch
        nonlocal next_sequence
        batch = TelemetryBatch(SampleFormat.MASSAGER_V1, next_sequence, next_sequence * 10, samples)
        next_sequence += len(samples)
        for body in batcher.add(batch):
            body["session_id"] = None
            service.publisher.publish(topic, body)

    cpu0 = time.process_time()
    await floor.paced(send, MESSAGE_COUNT, MESSAGES_PER_TICK, MESSAGE_TICK_S)
    service.publisher.flush()
    while service.link.published - published0 < MESSAGE_COUNT:  # noqa: ASYNC110
        await asyncio.sleep(0.005)  # the last acknowledgements
    cpu_s = time.process_time() - cpu0
    service.request_stop()
    await task
    return cpu_s


async def _message_costs(broker: Broker, workdir: Path) -> dict[str, list[float]]:
    """CPU per message (seconds) of the floor's publishing and the bridge's, interleaved."""
    sample_bytes = random.Random(2).randbytes(SAMPLE_RATE_HZ * BYTES_PER_SAMPLE)
    costs: dict[str, list[float]] = {FLOOR_MESSAGES: [], BRIDGE_MESSAGES: []}
    for repeat in range(MESSAGE_REPEATS):
        floor_s = await floor.messages(
            broker.port, sample_bytes, MESSAGE_COUNT, MESSAGES_PER_TICK, MESSAGE_TICK_S
        )
        costs[FLOOR_MESSAGES].append(floor_s / MESSAGE_COUNT)
        bridge_s = await _bridge_messages(broker, workdir / f"messages-{repeat}", sample_bytes)
        costs[BRIDGE_MESSAGES].append(bridge_s / MESSAGE_COUNT)
    return costs


def _per_sample_s(run: dict[str, Any]) -> float:
    return float(run["cpu_s"]) / max(int(run["samples"]), 1)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose CPU per sample is the median (its own figures, not a blend)."""
    return sorted(runs, key=_per_sample_s)[len(runs) // 2]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def _run_row(
    count: int, label: str, runs: list[dict[str, Any]], bare_s: float, floor_own_s: float | None
) -> tuple[tuple[object, ...], float]:
    """A table row for ``runs`` (its median run) and its own cost over the floor's."""
    run = _median_run(runs)
    whole_s = _per_sample_s(run)
    own_s = whole_s - bare_s
    ratio = own_s / floor_own_s if floor_own_s and floor_own_s > 0 else math.nan
    loss = "-"
    if "expected" in run:
        lost = 1 - run["received"] / run["expected"] if run["expected"] else 1.0
        loss = f"{lost:.2%} ({run['received']}/{run['expected']})"
    row = (
        count,
        label,
        run["samples"] / run["wall_s"],
        run["cpu_s"] / run["wall_s"],
        run["devices_cpu_s"] / run["wall_s"],
        f"{run['messages'] / run['wall_s']:.0f}",
        _us(whole_s),
        _us(own_s) if floor_own_s is not None or label.startswith("floor") else "-",
        _us(floor_own_s) if floor_own_s is not None else "-",
        f"{ratio:.2f}" if math.isfinite(ratio) else "-",
        loss,
    )
    return row, ratio


async def _run() -> bool:
    binary = shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto")
    if binary is None:
        print("service bench needs mosquitto: apt-get install mosquitto (or brew install)")
        return False
    rows: list[tuple[object, ...]] = []
    verdict: dict[str, bool] = {}
    message_costs: dict[str, list[float]] = {}
    where_cpu_goes: dict[str, dict[str, float]] = {}
    messages_per_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in DEVICE_COUNTS:
            runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
            broker = Broker(Path(tmp))
            await broker.start(binary)
            try:
                # Interleaved, so that a noisy stretch of the machine hits every case alike.
                for repeat in range(REPEATS):
                    folder = Path(tmp) / f"{count}-{repeat}"
                    runs[BARE].append(await _bare(count))
                    runs[FLOOR_STREAM].append(
                        await _floor(count, broker, folder / "fs", record=False)
                    )
                    runs[FLOOR_RECORD].append(
                        await _floor(count, broker, folder / "fr", record=True)
                    )
                    runs[STREAM].append(
                        await _service(count, broker, folder / "s", with_routine=False)
                    )
                    runs[ROUTINE_CASE].append(
                        await _service(count, broker, folder / "r", with_routine=True)
                    )
                if count == TARGET_DEVICES:
                    message_costs = await _message_costs(broker, Path(tmp))
                    where_cpu_goes = await _where_cpu_goes(broker, Path(tmp))
            finally:
                await broker.stop()
            bare_s = _per_sample_s(_median_run(runs[BARE]))
            floor_stream_s = _per_sample_s(_median_run(runs[FLOOR_STREAM])) - bare_s
            floor_record_s = _per_sample_s(_median_run(runs[FLOOR_RECORD])) - bare_s
            bare_run = _median_run(runs[BARE])
            rows.append(
                (
                    count,
                    BARE,
                    bare_run["samples"] / bare_run["wall_s"],
                    bare_run["cpu_s"] / bare_run["wall_s"],
                    bare_run["devices_cpu_s"] / bare_run["wall_s"],
                    "-",
                    _us(bare_s),
                    "-",
                    "-",
                    "-",
                    "-",
                )
            )
            floor_stream_row, _ = _run_row(count, FLOOR_STREAM, runs[FLOOR_STREAM], bare_s, None)
            stream_row, stream_ratio = _run_row(count, STREAM, runs[STREAM], bare_s, floor_stream_s)
            floor_record_row, _ = _run_row(count, FLOOR_RECORD, runs[FLOOR_RECORD], bare_s, None)
            routine_row, routine_ratio = _run_row(
                count, ROUTINE_CASE, runs[ROUTINE_CASE], bare_s, floor_record_s
            )
            rows += [floor_stream_row, stream_row, floor_record_row, routine_row]
            if count == TARGET_DEVICES:
                for case in (FLOOR_STREAM, STREAM):
                    run = _median_run(runs[case])
                    messages_per_s[case] = run["messages"] / run["wall_s"]
                bridge_runs = runs[STREAM] + runs[ROUTINE_CASE]
                stream_own_s = _per_sample_s(_median_run(runs[STREAM])) - bare_s
                radio = (
                    BYTES_PER_SAMPLE * 8 / stream_own_s / BLE_RADIO_BITS_PER_S
                    if stream_own_s > 0
                    else math.inf
                )
                verdict = {
                    f"streaming to MQTT only: own <= {TARGET_STREAM_X_FLOOR}x the floor's "
                    f"({stream_ratio:.2f}x)": stream_ratio <= TARGET_STREAM_X_FLOOR,
                    f"a routine on each device: own <= {TARGET_ROUTINE_X_FLOOR}x the floor's "
                    f"({routine_ratio:.2f}x)": routine_ratio <= TARGET_ROUTINE_X_FLOOR,
                    "100 devices x 100 Hz on time (both bridge paths)": all(
                        r["samples"] / r["wall_s"] >= 0.95 * count * SAMPLE_RATE_HZ
                        for r in bridge_runs
                    ),
                    "one core (the host's process CPU < 1.0 s/s, both paths)": all(
                        r["cpu_s"] / r["wall_s"] < 1.0 for r in bridge_runs
                    ),
                    # Every repetition, not only the median one, must deliver everything.
                    "no loss, in order (both bridge paths)": all(
                        r["received"] == r["expected"] and r["ordered"] and r["lost_on_links"] == 0
                        for r in bridge_runs
                    ),
                    f"streaming own cost >= {TARGET_RADIO_RATIO:.0f}x one BLE radio "
                    f"({radio:.1f}x)": radio >= TARGET_RADIO_RATIO,
                }
    print_table(
        f"service end to end: massagers at {SAMPLE_RATE_HZ} Hz, {DURATION_S:g} s realtime, "
        f"through Mosquitto; median of {REPEATS} interleaved runs. whole = process CPU per "
        "sample (the host's process: the devices run in another); own = whole - bare's; "
        "x floor = bridge own / floor own; devices CPU s/s = the simulated devices' process "
        "(not in any figure: the machine's other load); MQTT msgs/s = messages published "
        "(the bridge's include the devices' states and events and the engine's decisions, "
        "which the floor does not publish)",
        [
            "devices",
            "case",
            "samples/s",
            "process CPU s/s",
            "devices CPU s/s",
            "MQTT msgs/s",
            "whole us/sample",
            "own us/sample",
            "floor own us/sample",
            "x floor",
            "loss (bridge)",
        ],
        rows,
    )
    for name, ok in verdict.items():
        print(f"  {name}: {'met' if ok else 'MISSED'}")
    _print_message_costs(message_costs, messages_per_s)
    _print_where_cpu_goes(where_cpu_goes)
    print(describe_machine())
    passed = all(verdict.values())
    print(f"service target {'met' if passed else 'MISSED'}")
    return passed


def _print_message_costs(costs: dict[str, list[float]], messages_per_s: dict[str, float]) -> None:
    if not costs:
        return
    floor_s = sorted(costs[FLOOR_MESSAGES])[len(costs[FLOOR_MESSAGES]) // 2]
    rows = []
    for case, runs in costs.items():
        median_s = sorted(runs)[len(runs) // 2]
        rows.append(
            (case, _us(median_s), f"{median_s / floor_s:.2f}", " ".join(_us(r) for r in runs))
        )
    print_table(
        f"one telemetry message ({SAMPLE_RATE_HZ * BYTES_PER_SAMPLE} sample bytes), "
        f"{MESSAGE_COUNT} at {MESSAGES_PER_TICK / MESSAGE_TICK_S:.0f}/s through the same "
        f"Mosquitto, until acknowledged; median of {MESSAGE_REPEATS} interleaved runs",
        ["case", "process CPU us/message", "x floor", "runs"],
        rows,
    )
    if len(messages_per_s) == 2:
        bridge, floor_rate = messages_per_s[STREAM], messages_per_s[FLOOR_STREAM]
        print(
            f"  at {TARGET_DEVICES} devices, streaming: the bridge published {bridge:.0f} "
            f"messages/s, the floor {floor_rate:.0f} ({bridge / floor_rate:.2f}x: the "
            "devices' states and events, which the floor does not publish)"
        )


def run() -> bool:
    return asyncio.run(_run())


if __name__ == "__main__":
    if sys.argv[1:2] == ["devices"] and len(sys.argv) == 3:
        asyncio.run(_serve_devices(int(sys.argv[2])))
    else:
        sys.exit(0 if run() else 1)
