"""The registry of paired devices, in SQLite.

A device is identified by its serial number, not by its address (addresses are
not stable on every platform); the address is kept only as the last place the
device was seen. A device of a catalogue family that exposes no serial number is
identified by the family's identity rule instead (``foreo@<address>``: see
:func:`devicebridge.core.catalogue.device_identity`), kept in the same column.
Firmware versions are recorded with the time each was first seen, so a support
question can be answered with the device's update history.

The schema is versioned with ``PRAGMA user_version`` and migrated forward on
open; the database runs in WAL mode so that a ``watch`` in one terminal and a
``devices`` in another do not block each other.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from devicebridge.errors import (
    AlreadyPairedError,
    DuplicateNameError,
    RegistryError,
    RegistrySchemaError,
    UnknownDeviceError,
)
from devicebridge.storage.sqlite import connect, migrate

REGISTRY_FILENAME: Final = "registry.sqlite3"

TransportKind = Literal["ble", "serial"]

# Each entry migrates from version i to i + 1; never edit one that has shipped.
_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE devices (
        serial_number TEXT PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        kind          TEXT NOT NULL,
        model         TEXT NOT NULL,
        last_address  TEXT,
        transport     TEXT NOT NULL CHECK (transport IN ('ble', 'serial')),
        serial_port   TEXT,
        paired_at     TEXT NOT NULL
    );
    CREATE TABLE firmware_history (
        serial_number TEXT NOT NULL REFERENCES devices (serial_number) ON DELETE CASCADE,
        version       TEXT NOT NULL,
        first_seen_at TEXT NOT NULL,
        PRIMARY KEY (serial_number, version)
    );
    """,
    # The device catalogue's family (devices paired before it existed speak OFCP).
    """
    ALTER TABLE devices ADD COLUMN family TEXT NOT NULL DEFAULT 'ofcp';
    """,
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


@dataclass(frozen=True, slots=True)
class PairedDevice:
    name: str
    serial_number: str  # or the catalogue's identity of a device that exposes none
    kind: str  # "massager", "led_mask"
    model: str
    transport: TransportKind
    last_address: str | None = None  # BLE address last seen
    serial_port: str | None = None  # for transport == "serial"
    paired_at: datetime | None = None  # set by the registry when None
    family: str = "ofcp"  # the device catalogue's family id


@dataclass(frozen=True, slots=True)
class FirmwareRecord:
    serial_number: str
    version: str
    first_seen_at: datetime


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DeviceRegistry:
    """Paired devices in one SQLite file; use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path, *, now: Callable[[], datetime] = _utc_now) -> None:
        self.path = path
        self._now = now
        try:
            self._db = connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"cannot open the registry: {exc}", path=path) from exc
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise RegistryError(f"unreadable registry database: {exc}", path=path) from exc
        except RegistryError:
            self._db.close()
            raise

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> DeviceRegistry:
        return cls(data_dir / REGISTRY_FILENAME)

    def __enter__(self) -> DeviceRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a check-then-insert cannot
        # race another process doing the same.
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot start a transaction: {exc}", path=self.path) from exc
        try:
            yield self._db
        except sqlite3.Error as exc:
            self._db.execute("ROLLBACK")
            raise RegistryError(f"registry update failed: {exc}", path=self.path) from exc
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        newer = migrate(self._db, _MIGRATIONS)
        if newer is not None:
            raise RegistrySchemaError(
                f"registry schema version {newer} is newer than this devicebridge "
                f"understands ({SCHEMA_VERSION}); upgrade devicebridge",
                found_version=newer,
                path=self.path,
            )

    # ------------------------------------------------------------------ devices

    def add(self, device: PairedDevice) -> PairedDevice:
        """Store a newly paired device; returns it with ``paired_at`` set."""
        paired_at = device.paired_at or self._now()
        with self._transaction() as db:
            row = db.execute(
                "SELECT serial_number FROM devices WHERE name = ?", (device.name,)
            ).fetchone()
            if row is not None:
                if row[0] == device.serial_number:
                    raise AlreadyPairedError(
                        device.serial_number, existing_name=device.name, path=self.path
                    )
                raise DuplicateNameError(device.name, existing_serial=row[0], path=self.path)
            row = db.execute(
                "SELECT name FROM devices WHERE serial_number = ?", (device.serial_number,)
            ).fetchone()
            if row is not None:
                raise AlreadyPairedError(device.serial_number, existing_name=row[0], path=self.path)
            db.execute(
                "INSERT INTO devices (serial_number, name, kind, model, last_address, transport,"
                " serial_port, paired_at, family) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device.serial_number,
                    device.name,
                    device.kind,
                    device.model,
                    device.last_address,
                    device.transport,
                    device.serial_port,
                    paired_at.isoformat(),
                    device.family,
                ),
            )
        return PairedDevice(
            device.name,
            device.serial_number,
            device.kind,
            device.model,
            device.transport,
            device.last_address,
            device.serial_port,
            paired_at,
            device.family,
        )

    @staticmethod
    def _row_to_device(row: sqlite3.Row | tuple[str, ...]) -> PairedDevice:
        serial, name, kind, model, address, raw_transport, port, paired_at, family = row
        # The CHECK constraint keeps other values out of the table.
        transport: TransportKind = "serial" if raw_transport == "serial" else "ble"
        return PairedDevice(
            name,
            serial,
            kind,
            model,
            transport,
            address,
            port,
            datetime.fromisoformat(paired_at),
            family,
        )

    _COLUMNS: Final = (
        "serial_number, name, kind, model, last_address, transport, serial_port, paired_at, family"
    )

    def get(self, name: str) -> PairedDevice:
        row = self._db.execute(
            f"SELECT {self._COLUMNS} FROM devices WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise UnknownDeviceError(name, path=self.path)
        return self._row_to_device(row)

    def find_by_serial(self, serial_number: str) -> PairedDevice | None:
        row = self._db.execute(
            f"SELECT {self._COLUMNS} FROM devices WHERE serial_number = ?", (serial_number,)
        ).fetchone()
        return None if row is None else self._row_to_device(row)

    def list_devices(self) -> list[PairedDevice]:
        rows = self._db.execute(f"SELECT {self._COLUMNS} FROM devices ORDER BY name").fetchall()
        return [self._row_to_device(row) for row in rows]

    def remove(self, name: str) -> PairedDevice:
        """Forget a device (and its firmware history); returns what was removed."""
        with self._transaction() as db:
            row = db.execute(
                f"SELECT {self._COLUMNS} FROM devices WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise UnknownDeviceError(name, path=self.path)
            db.execute("DELETE FROM devices WHERE name = ?", (name,))
        return self._row_to_device(row)

    def update_address(self, serial_number: str, address: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE devices SET last_address = ? WHERE serial_number = ?",
                (address, serial_number),
            )

    # ------------------------------------------------------------------ firmware

    def record_firmware(self, serial_number: str, version: str) -> bool:
        """Note that the device runs ``version``; ``True`` if this version is new for it.

        A device that reports no version (an empty one: FOREO) has no history to keep."""
        if not version:
            return False
        with self._transaction() as db:
            if (
                db.execute(
                    "SELECT 1 FROM devices WHERE serial_number = ?", (serial_number,)
                ).fetchone()
                is None
            ):
                raise RegistryError(
                    f"cannot record firmware: no paired device with serial {serial_number}",
                    path=self.path,
                )
            cursor = db.execute(
                "INSERT OR IGNORE INTO firmware_history (serial_number, version, first_seen_at)"
                " VALUES (?, ?, ?)",
                (serial_number, version, self._now().isoformat()),
            )
            return cursor.rowcount == 1

    def firmware_history(self, serial_number: str) -> list[FirmwareRecord]:
        rows = self._db.execute(
            "SELECT serial_number, version, first_seen_at FROM firmware_history"
            " WHERE serial_number = ? ORDER BY first_seen_at, rowid",
            (serial_number,),
        ).fetchall()
        return [FirmwareRecord(s, v, datetime.fromisoformat(t)) for s, v, t in rows]

    def current_firmware(self, serial_number: str) -> str | None:
        history = self.firmware_history(serial_number)
        return history[-1].version if history else None
