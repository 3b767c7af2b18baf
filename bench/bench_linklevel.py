"""Link-level mode (bumble) against the in-process bleak backend, through the real BleakClient.

Both worlds run one massager; the host subscribes to Telemetry through
``BleakClient`` and the firmware floods 20-byte notifications through its
DeviceLink; then the host sends PING commands and waits for each ack. The
in-process backend is the baseline, measured in the same run. Target: link-level
mode carries at least 1,000 notifications/s (100 devices at 10 batches/s; the
test worlds need 300/s at speed 10).
"""

from __future__ import annotations

import asyncio
import time

from bleak import BleakClient

from bench.report import print_table
from protocols import CONTROL_CHAR_UUID, TELEMETRY_CHAR_UUID, Command, Ping
from simulators import Channel, SimulatedWorld, VirtualClock

NOTIFICATIONS = 5_000
ROUND_TRIPS = 300
PAYLOAD = bytes(20)
TARGET_NOTIFICATIONS_PER_S = 1_000.0
SAFETY_S = 60.0


async def _measure(world: SimulatedWorld) -> tuple[float, float, float]:
    """Notifications/s, CPU microseconds per notification, mean write->ack milliseconds."""
    massager = world.add_massager()
    async with world:
        client = BleakClient(massager.address, backend=world.client_backend)
        await client.connect()
        await client.pair()
        received = 0
        flood_done = asyncio.Event()

        def on_telemetry(_char: object, _data: bytearray) -> None:
            nonlocal received
            received += 1
            if received == NOTIFICATIONS:
                flood_done.set()

        await client.start_notify(TELEMETRY_CHAR_UUID, on_telemetry)
        link = massager.link
        assert link is not None
        wall_s, cpu_s = time.perf_counter(), time.process_time()
        for _ in range(NOTIFICATIONS):
            link.send(Channel.TELEMETRY, PAYLOAD)
        await asyncio.wait_for(flood_done.wait(), SAFETY_S)
        wall_s, cpu_s = time.perf_counter() - wall_s, time.process_time() - cpu_s

        acked: asyncio.Queue[bytes] = asyncio.Queue()
        await client.start_notify(CONTROL_CHAR_UUID, lambda _c, data: acked.put_nowait(bytes(data)))
        started_s = time.perf_counter()
        for command_id in range(1, ROUND_TRIPS + 1):
            await client.write_gatt_char(
                CONTROL_CHAR_UUID, Command.of(command_id, Ping()).encode(), response=True
            )
            await asyncio.wait_for(acked.get(), SAFETY_S)
        round_trip_ms = (time.perf_counter() - started_s) / ROUND_TRIPS * 1e3
        await client.disconnect()
    return NOTIFICATIONS / wall_s, cpu_s / NOTIFICATIONS * 1e6, round_trip_ms


async def _run() -> bool:
    from simulators.linklevel import LinkLevelWorld, link_level_clock

    baseline = await _measure(SimulatedWorld(seed=1, clock=VirtualClock()))
    link_level = await _measure(LinkLevelWorld(seed=1, clock=link_level_clock()))
    rows = [
        ("in-process (baseline)", *baseline, 1.0),
        ("link-level (bumble)", *link_level, link_level[0] / baseline[0]),
    ]
    print_table(
        f"link-level mode: {NOTIFICATIONS} notifications of {len(PAYLOAD)} bytes, "
        f"{ROUND_TRIPS} write->ack round trips",
        ["backend", "notifications/s", "CPU us/notification", "write->ack ms", "rate ratio"],
        rows,
    )
    met = link_level[0] >= TARGET_NOTIFICATIONS_PER_S
    print(
        f"target: link-level >= {TARGET_NOTIFICATIONS_PER_S:,.0f} notifications/s: "
        f"{'met' if met else 'MISSED'}"
    )
    return met


def run() -> bool:
    return asyncio.run(_run())
