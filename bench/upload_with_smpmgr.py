"""One image upload by the stock smpmgr, run by the Python of smpmgr's own environment.

``bench firmware`` starts this as ``.venv-smpmgr/bin/python bench/upload_with_smpmgr.py``:
smpmgr's upload routine (``upload_with_progress_bar``, what ``smpmgr image upload``
runs) over smpclient's own ``SMPBLETransport``, whose bleak classes are pointed at
the bench's simulated device through :mod:`ble_proxy` (they would otherwise look for
a Bluetooth adapter). It connects, uploads, and writes the wall seconds the upload
took (after the connection) as JSON to ``--result``. Imports nothing of devicebridge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import ble_proxy  # this file's directory is on sys.path when run as a script
import smpclient.transport.ble as smp_ble
from bleak import BleakClient, BleakScanner
from smpclient import SMPClient
from smpmgr.image_management import upload_with_progress_bar


async def upload(server: tuple[str, int], name: str, image: Path) -> dict[str, Any]:
    scanner_backend, client_backend = ble_proxy.bind(server)

    class Scanner(BleakScanner):
        @classmethod
        async def find_device_by_name(  # type: ignore[override]
            cls,
            name: str,
            timeout: float = 10.0,  # noqa: ASYNC109 (bleak's signature)
            **kwargs: Any,
        ) -> Any:
            return await BleakScanner.find_device_by_name(name, timeout, backend=scanner_backend)

    class Client(BleakClient):
        def __init__(self, device: Any, **kwargs: Any) -> None:
            super().__init__(device, backend=client_backend, **kwargs)

    # smpclient's BLE transport names its bleak classes at module level.
    smp_ble.BleakScanner, smp_ble.BleakClient = Scanner, Client  # type: ignore[misc]
    client = SMPClient(smp_ble.SMPBLETransport(), name, timeout_s=10.0)
    await client.connect()
    started_s = time.perf_counter()
    with image.open("rb") as file:
        await upload_with_progress_bar(client, file)
    upload_s = time.perf_counter() - started_s
    await client.disconnect()
    return {"upload_s": upload_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True, help="HOST:PORT of the BLE proxy")
    parser.add_argument("--name", required=True, help="the device's advertised name")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args()
    host, _, port = args.server.rpartition(":")
    result = asyncio.run(upload((host, int(port)), args.name, args.image))
    args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
