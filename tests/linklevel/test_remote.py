"""The simulator in its own process, reached over HCI on TCP through the same bleak seam."""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import AsyncIterator

import pytest

from devicebridge.core.reassembly import TelemetryItem
from devicebridge.device.session import Subscription, session_class_for
from devicebridge.device.transport.ble import BleBackends, BleTransport, scan
from protocols import DeviceKind, TelemetryBatch
from simulators.linklevel import link_level_clock
from simulators.linklevel.remote import HCI_LINE_PREFIX, RemoteLinkLevel

from .conftest import HANG_SAFETY_S, SEED, within_safety

DEVICE_COUNT = 2


async def iterate_batches(
    subscription: Subscription[TelemetryItem],
) -> AsyncIterator[TelemetryBatch]:
    """Only the batches of a telemetry subscription (gaps skipped)."""
    async for item in subscription:
        if isinstance(item, TelemetryBatch):
            yield item


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A simulator process: its HCI transport name and its devices' serials by kind."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.linklevel",
        "--massagers=1",
        "--masks=1",
        f"--seed={SEED}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        lines = [
            (await within_safety(process.stdout.readline())).decode().strip()
            for _ in range(1 + DEVICE_COUNT)
        ]
        assert lines[0].startswith(HCI_LINE_PREFIX), lines
        serials = {line.split()[0]: line.split()[1] for line in lines[1:]}
        yield lines[0].removeprefix(HCI_LINE_PREFIX), serials
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), HANG_SAFETY_S)


async def test_a_host_in_another_process_discovers_pairs_and_streams(
    simulator: tuple[str, dict[str, str]],
) -> None:
    hci, serials = simulator
    clock = link_level_clock()  # the host's own timeouts; the devices keep their own time
    clock.start()
    try:
        async with RemoteLinkLevel(hci) as remote:
            found = await scan(clock, 1.0, remote.scanner_backend)
            assert {d.serial_number for d in found} == set(serials.values())
            massager = next(d for d in found if d.kind is DeviceKind.MASSAGER)
            transport = BleTransport(
                clock,
                device=massager,
                backends=BleBackends(remote.scanner_backend, remote.client_backend),
            )
            session = session_class_for(massager.kind)(transport, clock, rng=random.Random(SEED))
            batches = iterate_batches(session.telemetry())
            await within_safety(session.start())  # pairs for the encrypted Control
            assert session.device_info.serial_number == serials["massager"]
            assert transport.max_message_bytes == 247 - 3
            first = await within_safety(anext(batches))
            second = await within_safety(anext(batches))
            assert second.first_sequence == first.first_sequence + len(first)
            await session.close()
    finally:
        await clock.stop()
