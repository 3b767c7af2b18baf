"""The two baselines every host-cost figure is measured against, in the bench's own run.

Both reach the devices through the bleak backends they are given (``bench service``: the
simulated massagers in a process of their own, behind :mod:`bench.ble_proxy`).

* ``bare``: each device's telemetry notifications going to a callback that only counts
  them. What is left when the host does nothing: bleak and its backend delivering the
  notifications, the event loop.
* ``floor``: a minimal, self-contained script doing the bridge's work on the same
  devices without the bridge's layers (no transport, session, reassembly, engine, store,
  outbox): each notification decoded with numpy; when recording, its pressures compared
  with the cheek cap and its samples written to SQLite in one transaction every 0.25 s;
  one JSON message per device per second (the bridge's message body: base64 samples and
  their sequence) published to the broker at QoS 1, several in flight.

``bridge - bare`` is the bridge's own cost per sample, ``floor - bare`` the floor's.

:func:`messages` is the floor's publishing alone, for what one MQTT message costs it
(``bench service``'s second table).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import struct
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiomqtt
import numpy as np
from bleak import BleakClient, BleakScanner

from devicebridge.core.policy import default_policy
from devicebridge.device.transport.ble import BleBackends
from protocols import CONTROL_CHAR_UUID, TELEMETRY_CHAR_UUID, Command, StartStream
from protocols.telemetry import BATCH_HEADER, MASSAGER_SAMPLE_DTYPE

WRITE_INTERVAL_S: Final = 0.25
MESSAGE_SAMPLES: Final = 100  # one message per device per second at 100 Hz
CHEEK_CAP_DAPA: Final = round(default_policy().zones["cheek"].cap_kpa.value * 100)
FIND_TIMEOUT_S: Final = 10.0
_HEADER: Final = struct.Struct("<BBII")
assert _HEADER.size == BATCH_HEADER.size


@dataclass
class Measured:
    cpu_s: float
    wall_s: float
    samples: int
    extra: dict[str, Any] = field(default_factory=dict)


async def _connect(
    backends: BleBackends, address: str, on_telemetry: Callable[[Any, bytearray], None]
) -> BleakClient:
    device = await BleakScanner.find_device_by_address(
        address, timeout=FIND_TIMEOUT_S, backend=backends.scanner
    )
    if device is None:
        raise RuntimeError(f"{address} not found")
    client = BleakClient(device, backend=backends.client)
    await client.connect()
    await client.start_notify(CONTROL_CHAR_UUID, lambda _c, _d: None)
    await client.start_notify(TELEMETRY_CHAR_UUID, on_telemetry)
    await client.write_gatt_char(
        CONTROL_CHAR_UUID, Command.of(1, StartStream()).encode(), response=True
    )
    return client


async def _window(
    duration_s: float,
    samples: Callable[[], int],
    messages: Callable[[], int] = lambda: 0,
    devices_cpu_s: Callable[[], float] = lambda: 0.0,
    during: AbstractContextManager[object] | None = None,
) -> Measured:
    """CPU, wall time, samples and (in ``extra``) MQTT messages and the CPU seconds of the
    devices' process over ``duration_s``; ``during`` is entered for the window (a
    :class:`bench.loop_cpu.LoopCpu`)."""
    cpu0, wall0, samples0, messages0, devices0 = (
        time.process_time(),
        time.perf_counter(),
        samples(),
        messages(),
        devices_cpu_s(),
    )
    with during or nullcontext():
        await asyncio.sleep(duration_s)  # measuring a realtime stream
    return Measured(
        time.process_time() - cpu0,
        time.perf_counter() - wall0,
        samples() - samples0,
        {"messages": messages() - messages0, "devices_cpu_s": devices_cpu_s() - devices0},
    )


async def bare(
    backends: BleBackends,
    addresses: list[str],
    duration_s: float,
    devices_cpu_s: Callable[[], float] = lambda: 0.0,
    during: AbstractContextManager[object] | None = None,
) -> Measured:
    """Counts the samples of every notification; nothing else. ``devices_cpu_s``: CPU
    seconds of the devices' process so far (for ``extra``); ``during``: as for
    :func:`_window`."""
    received = 0
    sample_bytes = MASSAGER_SAMPLE_DTYPE.itemsize

    def count(_char: Any, data: bytearray) -> None:
        nonlocal received
        received += (len(data) - _HEADER.size) // sample_bytes

    clients = [await _connect(backends, a, count) for a in addresses]
    measured = await _window(
        duration_s, lambda: received, devices_cpu_s=devices_cpu_s, during=during
    )
    for client in clients:
        await client.disconnect()
    return measured


class _FloorDevice:
    def __init__(self, floor: _Floor, serial: str) -> None:
        self.floor = floor
        self.serial = serial
        self.topic = f"devicebridge/v1/floor/devices/{serial}/telemetry"
        self.buffer = bytearray()
        self.first_sequence = 0
        self.count = 0

    def on_telemetry(self, _char: Any, data: bytearray) -> None:
        _, _, first, _ = _HEADER.unpack_from(data)
        samples = np.frombuffer(data, MASSAGER_SAMPLE_DTYPE, offset=_HEADER.size)
        floor = self.floor
        floor.samples += len(samples)
        raw = bytes(data[_HEADER.size :])
        if floor.record:
            if bool((samples["pressure_dapa"] > CHEEK_CAP_DAPA).any()):
                floor.over_cap += 1
            floor.rows.append((self.serial, first, len(samples), raw))
        if not self.count:
            self.first_sequence = first
        self.buffer += raw
        self.count += len(samples)
        if self.count >= MESSAGE_SAMPLES:
            floor.publish(self)

    def message(self) -> bytes:
        body = {
            "message_id": self.floor.next_id(),
            "serial": self.serial,
            "first_sequence": self.first_sequence,
            "count": self.count,
            "samples_b64": base64.b64encode(self.buffer).decode("ascii"),
        }
        self.first_sequence += self.count
        self.buffer.clear()
        self.count = 0
        return json.dumps(body, separators=(",", ":")).encode()


class _Floor:
    def __init__(self, client: aiomqtt.Client, db: sqlite3.Connection | None) -> None:
        self.client = client
        self.db = db
        self.record = db is not None
        self.samples = 0
        self.over_cap = 0
        self.rows: list[tuple[str, int, int, bytes]] = []
        self.sequence = 0
        self.in_flight: set[asyncio.Future[None]] = set()
        self.published = 0

    def next_id(self) -> str:
        self.sequence += 1
        return f"floor:{self.sequence}"

    def publish(self, device: _FloorDevice) -> None:
        sent = asyncio.ensure_future(self.client.publish(device.topic, device.message(), qos=1))
        self.in_flight.add(sent)
        sent.add_done_callback(self._acknowledged)

    def _acknowledged(self, sent: asyncio.Future[None]) -> None:
        self.in_flight.discard(sent)
        if not sent.cancelled() and sent.exception() is None:
            self.published += 1

    async def write_every(self, interval_s: float) -> None:
        assert self.db is not None
        while True:
            await asyncio.sleep(interval_s)
            rows, self.rows = self.rows, []
            if rows:
                with self.db:
                    self.db.execute("BEGIN")
                    self.db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?)", rows)


async def paced(send: Callable[[], None], count: int, per_tick: int, tick_s: float) -> None:
    """``send()`` ``count`` times, ``per_tick`` every ``tick_s`` wall seconds: a steady
    rate, as a fleet of devices gives."""
    for index in range(count):
        send()
        if index % per_tick == per_tick - 1:
            await asyncio.sleep(tick_s)  # pacing


async def messages(
    broker_port: int, sample_bytes: bytes, count: int, per_tick: int, tick_s: float
) -> float:
    """Process CPU seconds for ``count`` telemetry messages of ``sample_bytes`` each,
    published as :func:`floor` publishes them (``_FloorDevice.message`` and
    ``aiomqtt.Client.publish`` at QoS 1, several in flight), until all are acknowledged."""
    async with aiomqtt.Client("127.0.0.1", broker_port) as client:
        client.pending_calls_threshold = 10_000
        state = _Floor(client, None)
        device = _FloorDevice(state, "FLOOR")
        samples = len(sample_bytes) // MASSAGER_SAMPLE_DTYPE.itemsize

        def send() -> None:
            device.buffer += sample_bytes
            device.count = samples
            state.publish(device)

        cpu0 = time.process_time()
        await paced(send, count, per_tick, tick_s)
        if state.in_flight:
            await asyncio.wait(state.in_flight)
        cpu_s = time.process_time() - cpu0
    if state.published != count:
        raise RuntimeError(f"floor: {state.published} of {count} messages acknowledged")
    return cpu_s


def _samples_db(data_dir: Path) -> sqlite3.Connection:
    """The bridge's durability settings (WAL, synchronous NORMAL), one table of batches."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "floor.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(
        "CREATE TABLE samples (serial TEXT, first_sequence INTEGER, count INTEGER, data BLOB)"
    )
    return db


async def floor(
    backends: BleBackends,
    devices: list[tuple[str, str]],
    broker_port: int,
    data_dir: Path,
    *,
    record: bool,
    duration_s: float,
    devices_cpu_s: Callable[[], float] = lambda: 0.0,
    during: AbstractContextManager[object] | None = None,
) -> Measured:
    """``devices``: (address, serial) pairs. ``record``: cap check and SQLite too.
    ``devices_cpu_s``, ``during``: as for :func:`bare`."""
    db = _samples_db(data_dir) if record else None
    async with aiomqtt.Client("127.0.0.1", broker_port) as client:
        client.pending_calls_threshold = 10_000
        state = _Floor(client, db)
        writer = asyncio.create_task(state.write_every(WRITE_INTERVAL_S)) if record else None
        clients = []
        for address, serial in devices:
            device = _FloorDevice(state, serial)
            clients.append(await _connect(backends, address, device.on_telemetry))
        measured = await _window(
            duration_s, lambda: state.samples, lambda: state.sequence, devices_cpu_s, during
        )
        for ble in clients:
            await ble.disconnect()
        if writer is not None:
            writer.cancel()
        if state.in_flight:
            await asyncio.wait(state.in_flight)
    if db is not None:
        db.close()
    measured.extra.update(published=state.published, over_cap=state.over_cap)
    return measured
