"""Firmware upload throughput over the simulated BLE link: the bridge against smpmgr.

One simulated massager, one image, one run: the bridge's update path
(smpclient's ``upload`` over our ``BleSmpTransport`` on our BLE link) and the
stock smpmgr upload routine (smpclient's own ``SMPBLETransport``, its bleak
classes pointed at the simulator's backend) upload the same image to the same
device. The simulated link carries DEFAULT_BLE_BYTES_PER_S of airtime (requests
and responses both count); the clock runs in real time, so throughput is image
bytes per second against that limit.

Targets: the bridge within 5 % of smpmgr (or faster) and at least 80 % of the link limit.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bleak import BleakClient, BleakScanner

from bench.report import print_table
from devicebridge.firmware import BleSmpTransport, FirmwareUpdater, SmpBleLink, parse_image
from devicebridge.transport.ble import BleBackends
from simulators import SimulatedWorld, VirtualClock
from simulators.smp import build_image
from simulators.smp.firmware import DEFAULT_BLE_BYTES_PER_S

IMAGE_BODY_BYTES = 256 * 1024
TARGET_VS_SMPMGR = 0.95
TARGET_VS_LINK = 0.80


async def _timed(clock: VirtualClock, work: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    virtual_start_s, wall_start_s = clock.now_s(), time.perf_counter()
    await work()
    return clock.now_s() - virtual_start_s, time.perf_counter() - wall_start_s


async def _bench() -> list[tuple[str, float, float, float]]:
    # Real time: a fast clock jumps ahead while a host needs many loop turns to react
    # (smpclient's BLE transport runs each notification as a task), which would charge
    # it airtime it did not use.
    clock = VirtualClock(realtime=True)
    world = SimulatedWorld(seed=11, clock=clock)
    device = world.add_massager()
    firmware = world.smp_firmware(device)
    data = build_image("9.0.0", device.model_number, body_bytes=IMAGE_BODY_BYTES)
    image = parse_image(data, path="bench.bin")
    rows: list[tuple[str, float, float, float]] = []
    async with world:
        clock.start()
        try:
            # The bridge: our link, smpclient's upload.
            link = SmpBleLink(
                clock,
                serial_number=device.serial_number,
                backends=BleBackends(world.scanner_backend, world.client_backend),
            )
            updater = FirmwareUpdater(BleSmpTransport(link, clock), clock, device=device.name)
            await updater.connect()
            virtual_s, wall_s = await _timed(clock, lambda: updater.upload(image))
            await updater.close()
            assert firmware.secondary is not None
            assert firmware.secondary.hash == image.hash
            rows.append(
                ("devicebridge (BleSmpTransport)", len(data) / virtual_s, virtual_s, wall_s)
            )

            # smpmgr: its own upload routine and smpclient's own BLE transport.
            virtual_s, wall_s = await _smpmgr_upload(world, device.name, data, clock)
            assert firmware.secondary is not None
            assert firmware.secondary.hash == image.hash
            rows.append(("smpmgr (SMPBLETransport)", len(data) / virtual_s, virtual_s, wall_s))
        finally:
            await clock.stop()
    return rows


async def _smpmgr_upload(
    world: SimulatedWorld, name: str, data: bytes, clock: VirtualClock
) -> tuple[float, float]:
    import smpclient.transport.ble as smp_ble
    from smpclient import SMPClient
    from smpmgr.image_management import upload_with_progress_bar

    class Scanner(BleakScanner):
        # Simulated addresses are not MAC-shaped, so smpclient looks devices up by name.
        @classmethod
        async def find_device_by_name(  # type: ignore[override]
            cls,
            name: str,
            timeout: float = 10.0,  # noqa: ASYNC109 (bleak's signature)
            **kwargs: Any,
        ) -> Any:
            return await BleakScanner.find_device_by_name(
                name, timeout, backend=world.scanner_backend
            )

    class Client(BleakClient):
        def __init__(self, device: Any, **kwargs: Any) -> None:
            super().__init__(device, backend=world.client_backend, **kwargs)

    saved = smp_ble.BleakScanner, smp_ble.BleakClient
    smp_ble.BleakScanner, smp_ble.BleakClient = Scanner, Client  # type: ignore[misc]
    try:
        client = SMPClient(smp_ble.SMPBLETransport(), name, timeout_s=10.0)
        await client.connect()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.bin"
            path.write_bytes(data)
            with path.open("rb") as file:
                result = await _timed(clock, lambda: upload_with_progress_bar(client, file))
        await client.disconnect()
        return result
    finally:
        smp_ble.BleakScanner, smp_ble.BleakClient = saved  # type: ignore[misc]


def run() -> bool:
    rows = asyncio.run(_bench())
    bridge, smpmgr = rows[0][1], rows[1][1]
    limit = float(DEFAULT_BLE_BYTES_PER_S)
    table = [
        (name, rate / 1024, rate / smpmgr, rate / limit, virtual_s, wall_s)
        for name, rate, virtual_s, wall_s in rows
    ]
    table.append(("link limit (airtime)", limit / 1024, limit / smpmgr, 1.0, 0.0, 0.0))
    print_table(
        f"firmware upload over the simulated BLE link, {IMAGE_BODY_BYTES // 1024}"
        f" KiB image, MTU 247, SMP buf_size 2475 (target: >= {TARGET_VS_SMPMGR:.2f}x smpmgr,"
        f" >= {TARGET_VS_LINK:.0%} of the link)",
        ["uploader", "KiB/s", "x smpmgr", "x link", "clock s", "wall s"],
        table,
    )
    passed = bridge >= TARGET_VS_SMPMGR * smpmgr and bridge >= TARGET_VS_LINK * limit
    print(f"firmware target {'met' if passed else 'MISSED'}")
    return passed


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
