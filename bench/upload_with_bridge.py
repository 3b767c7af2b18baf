"""One image upload by devicebridge, run by the Python of the project's environment.

``bench firmware`` starts this as ``python bench/upload_with_bridge.py``, so the bridge
meets the device exactly as smpmgr does (its own process, bleak through
:mod:`ble_proxy`): ``FirmwareUpdater.upload`` over ``BleSmpTransport`` on ``SmpBleLink``,
found by the serial number the device advertises. It connects, uploads, and writes
the wall seconds the upload took (after the connection), and what the pipeline did,
as JSON to ``--result``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import ble_proxy  # this file's directory is on sys.path when run as a script

from devicebridge.clock import SystemClock
from devicebridge.device.transport.ble import BleBackends
from devicebridge.firmware import BleSmpTransport, FirmwareUpdater, SmpBleLink, load_image


async def upload(server: tuple[str, int], serial_number: str, image_path: Path) -> dict[str, Any]:
    image = load_image(image_path)
    clock = SystemClock()
    link = SmpBleLink(
        clock, serial_number=serial_number, backends=BleBackends(*ble_proxy.bind(server))
    )
    updater = FirmwareUpdater(BleSmpTransport(link, clock), clock, device=serial_number)
    await updater.connect()
    started_s = time.perf_counter()
    await updater.upload(image)
    upload_s = time.perf_counter() - started_s
    await updater.close()
    stats = updater.last_upload
    return {
        "upload_s": upload_s,
        "pipeline": dataclasses.asdict(stats) if stats is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True, help="HOST:PORT of the BLE proxy")
    parser.add_argument("--serial", required=True, help="the device's serial number")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args()
    host, _, port = args.server.rpartition(":")
    result = asyncio.run(upload((host, int(port)), args.serial, args.image))
    args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
