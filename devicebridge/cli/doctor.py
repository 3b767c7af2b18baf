"""``devicebridge doctor``: what this machine offers devicebridge, and what is missing.

Every check reads; nothing is created or changed (the data directory is not made, no
store is opened for writing). Each check is ``ok``, ``warn`` (works, with a caveat),
``fail`` (this part will not work) or ``info``; the exit status is 1 when one fails.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import socket
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Final, Literal

import click

from devicebridge import __version__
from devicebridge.cli.base import EXIT_ERROR, CliContext, echo_json, pass_cli, reports_errors
from devicebridge.cli.table import Table

Status = Literal["ok", "warn", "fail", "info"]

PACKAGES: Final = (
    "bleak",
    "bleak-retry-connector",
    "pyserial",
    "numpy",
    "aiomqtt",
    "cryptography",
    "smpclient",
    "click",
    "rich",
    "matplotlib",
    "platformdirs",
)
BLUETOOTH_CHECK_S: Final = 3.0
BROKER_CHECK_S: Final = 2.0
LOW_FREE_BYTES: Final = 100 * 1024 * 1024
SYSFS_BLUETOOTH: Final = Path("/sys/class/bluetooth")


@dataclass(frozen=True, slots=True)
class Check:
    area: str
    status: Status
    detail: str


def _versions() -> list[Check]:
    python = f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"
    checks = [
        Check("devicebridge", "info", f"{__version__} on {python}"),
    ]
    found, missing = [], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    checks.append(Check("packages", "fail" if missing else "ok", ", ".join(found)))
    if missing:
        checks.append(Check("packages", "fail", f"missing: {', '.join(missing)} (reinstall)"))
    return checks


def _bluetooth(simulate: bool) -> list[Check]:
    checks = []
    if sys.platform.startswith("linux"):
        adapters = (
            sorted(p.name for p in SYSFS_BLUETOOTH.glob("hci*")) if SYSFS_BLUETOOTH.is_dir() else []
        )
        checks.append(
            Check(
                "bluetooth adapters",
                "ok" if adapters else "warn",
                ", ".join(adapters) if adapters else "none in /sys/class/bluetooth",
            )
        )
    scan_check = _scan_check()
    if simulate and scan_check.status == "fail":
        # Simulated devices need no Bluetooth: this machine is fine for what is asked.
        scan_check = Check(scan_check.area, "warn", scan_check.detail)
    checks.append(scan_check)
    if simulate:
        checks.append(Check("bluetooth", "info", "simulate is on: commands use simulated devices"))
    return checks


def _scan_check() -> Check:
    """Start and stop a real scan, briefly: the one test that the stack answers."""
    from devicebridge.clock import SystemClock
    from devicebridge.device.transport.ble import scan
    from devicebridge.errors import DeviceBridgeError

    async def probe() -> int:
        return len(await scan(SystemClock(), 0.5))

    try:
        count = asyncio.run(asyncio.wait_for(probe(), BLUETOOTH_CHECK_S))
    except TimeoutError:
        return Check("bluetooth scan", "fail", f"no answer within {BLUETOOTH_CHECK_S:g} s")
    except DeviceBridgeError as exc:
        return Check(
            "bluetooth scan", "fail", f"{exc}; use --simulate or a serial port (--serial-port)"
        )
    return Check("bluetooth scan", "ok", f"scanning works ({count} facial-care device(s) heard)")


def _serial_ports() -> list[Check]:
    from serial.tools import list_ports

    ports = sorted(list_ports.comports(), key=lambda p: p.device)
    if not ports:
        return [Check("serial ports", "info", "none")]
    checks = []
    for port in ports:
        usable = os.access(port.device, os.R_OK | os.W_OK)
        description = port.description if port.description not in (None, "n/a") else ""
        text = f"{port.device} {description}".strip()
        checks.append(
            Check(
                "serial port",
                "ok" if usable else "warn",
                text if usable else f"{text}: no read/write permission (join the dialout group?)",
            )
        )
    return checks


def _data_dir(cli: CliContext) -> list[Check]:
    path = cli.data_dir
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        creatable = parent is not None and os.access(parent, os.W_OK | os.X_OK)
        return [
            Check(
                "data directory",
                "ok" if creatable else "fail",
                f"{path} (not created yet; "
                + ("it will be on first use)" if creatable else f"{parent} is not writable)"),
            )
        ]
    if not path.is_dir():
        return [Check("data directory", "fail", f"{path} is not a directory")]
    writable = os.access(path, os.W_OK | os.X_OK)
    free = shutil.disk_usage(path).free
    used = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    mode = oct(path.stat().st_mode & 0o777)
    return [
        Check(
            "data directory",
            "ok" if writable else "fail",
            f"{path} ({'writable' if writable else 'NOT writable'}, mode {mode}, "
            f"{used / 1e6:.1f} MB used)",
        ),
        Check(
            "free space",
            "ok" if free >= LOW_FREE_BYTES else "warn",
            f"{free / 1e9:.1f} GB free there",
        ),
    ]


def _config(cli: CliContext) -> list[Check]:
    from devicebridge.cli.settings import settings_rows

    path = cli.config_path
    if not path.is_file():
        return [Check("config file", "info", f"{path} (not there: defaults)")]
    from_file = [r["key"] for r in settings_rows(cli) if r["source"] == "file"]
    return [Check("config file", "ok", f"{path}; sets: {', '.join(from_file) or 'nothing'}")]


def _broker(cli: CliContext) -> list[Check]:
    mqtt = cli.settings.mqtt
    if mqtt is None:
        return [Check("broker", "info", "none configured (serve works locally)")]
    where = f"{mqtt.host}:{mqtt.port}"
    try:
        with socket.create_connection((mqtt.host, mqtt.port), timeout=BROKER_CHECK_S):
            pass
    except OSError as exc:
        return [Check("broker", "fail", f"{where} unreachable: {exc.strerror or exc}")]
    tls = " (TLS)" if mqtt.tls_ca_file or mqtt.tls_cert_file else ""
    return [Check("broker", "ok", f"{where} reachable{tls}")]


def _trust_and_bridge(cli: CliContext) -> list[Check]:
    import sqlite3

    from devicebridge.service.status import read_status_file
    from devicebridge.storage.keys import key_dir
    from devicebridge.storage.programs import PROGRAMS_FILENAME

    checks = []
    programs = cli.data_dir / PROGRAMS_FILENAME
    if programs.is_file():
        try:
            db = sqlite3.connect(f"file:{programs}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT therapist_id FROM trusted_keys").fetchall()
            finally:
                db.close()
            therapists = sorted({r[0] for r in rows})
            checks.append(
                Check(
                    "trusted keys",
                    "info",
                    f"{len(rows)} ({', '.join(therapists)})" if rows else "none",
                )
            )
        except sqlite3.Error as exc:
            checks.append(Check("trusted keys", "warn", f"{programs}: {exc}"))
    else:
        checks.append(Check("trusted keys", "info", "none"))
    keys = sorted(p.stem for p in key_dir().glob("*.pem")) if key_dir().is_dir() else []
    checks.append(
        Check(
            "signing keys",
            "info",
            f"{', '.join(keys)} in {key_dir()}" if keys else f"none in {key_dir()}",
        )
    )
    status = read_status_file(cli.data_dir) if cli.data_dir.is_dir() else None
    if status is None:
        checks.append(Check("bridge", "info", "no bridge has run here"))
    elif status.get("alive"):
        checks.append(
            Check(
                "bridge",
                "ok",
                f"running here (pid {status.get('pid')}, {status.get('bridge_id', '?')})",
            )
        )
    else:
        checks.append(Check("bridge", "info", f"not running (last: {status.get('state')})"))
    return checks


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--no-bluetooth", is_flag=True, help="Skip the Bluetooth scan check.")
@pass_cli
@reports_errors
def doctor_command(cli: CliContext, as_json: bool, no_bluetooth: bool) -> None:
    """Check this machine: versions, Bluetooth, serial ports, data directory, configuration,
    broker, keys, and whether a bridge runs here."""
    checks = [
        *_versions(),
        *([] if no_bluetooth else _bluetooth(cli.simulate)),
        *_serial_ports(),
        *_data_dir(cli),
        *_config(cli),
        *_broker(cli),
        *_trust_and_bridge(cli),
    ]
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        echo_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        table = Table(("check", "", "detail"))
        marks = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "info": "-"}
        for c in checks:
            table.add_row(c.area, marks[c.status], c.detail)
        table.echo()
    if failed:
        raise click.exceptions.Exit(EXIT_ERROR)
