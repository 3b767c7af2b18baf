"""Firmware upload throughput over the simulated BLE link: the bridge against smpmgr.

One simulated massager (the device's SMP server and BLE link model from
``simulators.smp``: a 2475-byte SMP buffer, 4 buffers, MTU 247, 100 kB/s of
airtime shared by both directions, connection events 7.5 ms apart) and one
256 KiB image. Each uploader runs in a process of its own and reaches the device
through the same bleak proxy (``bench/ble_proxy.py``): the stock smpmgr from its
own environment (``.venv-smpmgr``, which the project keeps apart because smpmgr's
pins clash with ours), running its upload routine over smpclient's own
``SMPBLETransport``; and devicebridge from the project's environment, running
``FirmwareUpdater.upload`` over ``BleSmpTransport``. Before every upload the
device is put back to the same flash state, so each sends the whole image. The
runs are interleaved ``REPEATS`` times and each row shows its median. Two more
rows show what the proxy costs each design and count for no target: the bridge
in the bench's own process, and smpclient's upload over its own ``SMPBLETransport``
in the bench's process (smpmgr's loop without its progress bar; smpclient is the
same version in both environments).

The device's clock runs in real time (a fast virtual clock would run ahead of a
process it cannot see), so throughput is image bytes per second of wall time
against the link's airtime, ``DEFAULT_BLE_BYTES_PER_S``.

Targets (issue 15): the bridge at least 1.1x smpmgr and at least 0.95 of the link.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench import ble_proxy
from bench.report import describe_machine, print_table
from devicebridge.device.transport.ble import BleBackends
from devicebridge.firmware import (
    BleSmpTransport,
    FirmwareUpdater,
    SmpBleLink,
    parse_image,
)
from simulators import SimulatedWorld, VirtualClock
from simulators.smp import build_image
from simulators.smp.firmware import (
    DEFAULT_BLE_BYTES_PER_S,
    DEFAULT_BUF_COUNT,
    DEFAULT_BUF_SIZE,
)
from simulators.smp.radio import DEFAULT_CONNECTION_INTERVAL_S

IMAGE_BODY_BYTES: Final = 256 * 1024
REPEATS: Final = 3
TARGET_VS_SMPMGR: Final = 1.1
TARGET_VS_LINK: Final = 0.95
UPLOAD_TIMEOUT_S: Final = 120.0
ROOT: Final = Path(__file__).resolve().parents[1]
BENCH_DIR: Final = ROOT / "bench"
SMPMGR_VENV_SCRIPT: Final = "scripts/smpmgr-venv.sh"

BRIDGE: Final = "devicebridge (own process, via the proxy)"
SMPMGR: Final = "smpmgr (own process, via the proxy)"
IN_PROCESS: Final = "devicebridge (bench process, no proxy)"
SMPCLIENT_IN_PROCESS: Final = "smpclient.upload as smpmgr calls it (bench process, no proxy)"


@dataclass(slots=True)
class _Runs:
    upload_s: list[float] = field(default_factory=list)
    airtime_bytes: list[int] = field(default_factory=list)
    pipeline: dict[str, Any] | None = None


def _smpmgr_python() -> Path:
    venv = Path(os.environ.get("SMPMGR_VENV", ROOT / ".venv-smpmgr"))
    return venv / "bin" / "python"


async def _run_script(python: Path, script: str, args: list[str], env: dict[str, str]) -> Any:
    """Run one uploader script; return the JSON it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        process = await asyncio.create_subprocess_exec(
            str(python),
            str(BENCH_DIR / script),
            *args,
            "--result",
            str(result),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), UPLOAD_TIMEOUT_S)
        if process.returncode != 0 or not result.exists():
            tail = (stdout + stderr).decode(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"{script} failed ({process.returncode}):\n" + "\n".join(tail))
        return json.loads(result.read_text())


async def _bench(smpmgr_python: Path | None) -> dict[str, _Runs]:
    clock = VirtualClock(realtime=True)
    world = SimulatedWorld(seed=11, clock=clock)
    device = world.add_massager()
    firmware = world.smp_firmware(device)
    radio = firmware.radio
    assert radio is not None
    data = build_image("9.0.0", device.model_number, body_bytes=IMAGE_BODY_BYTES)
    image = parse_image(data, path="bench.bin")
    runs = {name: _Runs() for name in (BRIDGE, SMPMGR, IN_PROCESS, SMPCLIENT_IN_PROCESS)}
    with tempfile.TemporaryDirectory() as tmp:
        image_path = Path(tmp) / "bench.bin"
        image_path.write_bytes(data)
        async with world:
            clock.start()
            factory = firmware.snapshot()
            server = await ble_proxy.serve(world.scanner_backend, world.client_backend)
            address = "{}:{}".format(*server.sockets[0].getsockname()[:2])
            bridge_env = {**os.environ, "PYTHONPATH": str(ROOT)}
            # smpmgr's Python must not see this environment's packages.
            smpmgr_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            uploaders: dict[str, Callable[[], Awaitable[Any]]] = {
                BRIDGE: lambda: _run_script(
                    Path(sys.executable),
                    "upload_with_bridge.py",
                    [
                        "--server",
                        address,
                        "--serial",
                        device.serial_number,
                        "--image",
                        str(image_path),
                    ],
                    bridge_env,
                ),
                IN_PROCESS: lambda: _in_process_upload(world, device.serial_number, image),
                SMPCLIENT_IN_PROCESS: lambda: _in_process_smpclient_upload(
                    world, device.name, data
                ),
            }
            if smpmgr_python is not None:
                uploaders[SMPMGR] = lambda: _run_script(
                    smpmgr_python,
                    "upload_with_smpmgr.py",
                    ["--server", address, "--name", device.name, "--image", str(image_path)],
                    smpmgr_env,
                )
            try:
                for _ in range(REPEATS):
                    for name, uploader in uploaders.items():
                        firmware.restore(factory)  # the same empty slot for every run
                        airtime_before = radio.bytes_on_air
                        result = await uploader()
                        if firmware.secondary is None or firmware.secondary.hash != image.hash:
                            raise RuntimeError(f"{name}: the device does not hold the image")
                        runs[name].upload_s.append(result["upload_s"])
                        runs[name].airtime_bytes.append(radio.bytes_on_air - airtime_before)
                        runs[name].pipeline = result.get("pipeline")
            finally:
                server.close()
                await server.wait_closed()
                await clock.stop()
    return runs


async def _in_process_upload(
    world: SimulatedWorld, serial_number: str, image: Any
) -> dict[str, Any]:
    clock = world.clock
    link = SmpBleLink(
        clock,
        serial_number=serial_number,
        backends=BleBackends(world.scanner_backend, world.client_backend),
    )
    updater = FirmwareUpdater(BleSmpTransport(link, clock), clock, device=serial_number)
    await updater.connect()
    started_s = time.perf_counter()
    await updater.upload(image)
    upload_s = time.perf_counter() - started_s
    await updater.close()
    return {"upload_s": upload_s}


async def _in_process_smpclient_upload(
    world: SimulatedWorld, name: str, data: bytes
) -> dict[str, Any]:
    """smpclient's upload over its own SMPBLETransport, bleak pointed at the simulator:
    the loop smpmgr's ``upload_with_progress_bar`` runs, without its progress bar."""
    import smpclient.transport.ble as smp_ble
    from bleak import BleakClient, BleakScanner
    from smpclient import SMPClient

    class Scanner(BleakScanner):
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
    # It warns on every disconnect, also one it asked for: not news in a table.
    logging.getLogger("smpclient").setLevel(logging.ERROR)
    try:
        client = SMPClient(smp_ble.SMPBLETransport(), name, timeout_s=10.0)
        await client.connect()
        started_s = time.perf_counter()
        async for _offset in client.upload(data):
            pass
        upload_s = time.perf_counter() - started_s
        await client.disconnect()
    finally:
        smp_ble.BleakScanner, smp_ble.BleakClient = saved  # type: ignore[misc]
    return {"upload_s": upload_s}


def _create_smpmgr_venv(venv_python: Path) -> bool:
    """Create smpmgr's own environment with the project's script (a fresh clone has none)."""
    print(f"\nbench firmware: creating smpmgr's environment with `bash {SMPMGR_VENV_SCRIPT}`")
    env = {**os.environ, "SMPMGR_VENV": str(venv_python.parent.parent)}
    done = subprocess.run(["bash", str(ROOT / SMPMGR_VENV_SCRIPT)], cwd=ROOT, env=env, check=False)
    return done.returncode == 0 and venv_python.exists()


def run() -> bool:
    smpmgr_python: Path | None = _smpmgr_python()
    if (
        smpmgr_python is not None
        and not smpmgr_python.exists()
        and not _create_smpmgr_venv(smpmgr_python)
    ):
        print(
            f"bench firmware: smpmgr's environment could not be created ({smpmgr_python}); "
            f"run `bash {SMPMGR_VENV_SCRIPT}` (it needs the package index). "
            "Measuring the bridge alone."
        )
        smpmgr_python = None
    runs = asyncio.run(_bench(smpmgr_python))
    image_bytes = len(build_image("9.0.0", "OFC-FM1", body_bytes=IMAGE_BODY_BYTES))
    link = float(DEFAULT_BLE_BYTES_PER_S)

    def rate(name: str) -> float:
        return image_bytes / statistics.median(runs[name].upload_s)

    smpmgr_rate = rate(SMPMGR) if runs[SMPMGR].upload_s else None

    def vs_smpmgr(bytes_per_s: float) -> float | str:
        return bytes_per_s / smpmgr_rate if smpmgr_rate else "-"

    rows = []
    for name in (BRIDGE, SMPMGR, IN_PROCESS, SMPCLIENT_IN_PROCESS):
        upload_s = runs[name].upload_s
        if not upload_s:
            continue
        bytes_per_s = rate(name)
        rows.append(
            (
                name,
                bytes_per_s / 1024,
                vs_smpmgr(bytes_per_s),
                bytes_per_s / link,
                statistics.median(upload_s),
                f"{min(upload_s):.2f}-{max(upload_s):.2f}",
            )
        )
    # Every byte of airtime spent on the upload, as the bridge framed it.
    ceiling = image_bytes / statistics.median(runs[BRIDGE].airtime_bytes) * link
    rows.append(
        (
            "ceiling: all airtime carrying the upload",
            ceiling / 1024,
            vs_smpmgr(ceiling),
            ceiling / link,
            image_bytes / ceiling,
            "-",
        )
    )
    rows.append(
        ("link limit (airtime)", link / 1024, vs_smpmgr(link), 1.0, image_bytes / link, "-")
    )
    print_table(
        f"firmware upload over the simulated BLE link: {image_bytes // 1024} KiB image, "
        f"MTU 247, SMP buffers {DEFAULT_BUF_COUNT} x {DEFAULT_BUF_SIZE} bytes, "
        f"connection interval {DEFAULT_CONNECTION_INTERVAL_S * 1000:g} ms; median of {REPEATS} "
        f"interleaved runs (targets: >= {TARGET_VS_SMPMGR:.2f}x smpmgr, >= {TARGET_VS_LINK:.0%} "
        "of the link)",
        ["uploader", "KiB/s", "x smpmgr", "x link", "upload s", "spread s"],
        rows,
    )
    pipeline = runs[BRIDGE].pipeline
    if pipeline is not None:
        print(
            f"bridge pipeline: {pipeline['requests']} requests, up to {pipeline['peak_in_flight']} "
            f"in flight, {pipeline['timeouts']} timeouts, {pipeline['resyncs']} resyncs"
        )
    print(describe_machine())
    bridge = rate(BRIDGE)
    if smpmgr_python is None:
        print("firmware target UNVERIFIED: no smpmgr to compare with")
        return False
    assert smpmgr_rate is not None
    passed = bridge >= TARGET_VS_SMPMGR * smpmgr_rate and bridge >= TARGET_VS_LINK * link
    print(f"firmware target {'met' if passed else 'MISSED'}")
    return passed


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
