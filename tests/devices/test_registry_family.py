"""The registry keeps each device's catalogue family; devices paired before the catalogue
existed are OFCP devices."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from devicebridge.storage.registry import DeviceRegistry, PairedDevice

# The registry's schema as it shipped before families (version 1).
VERSION_1 = """
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
"""


def test_a_registry_from_before_families_is_migrated_with_its_devices_as_ofcp(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(VERSION_1)
    db.execute(
        "INSERT INTO devices VALUES ('FM00ABCDEF', 'face', 'massager', 'FM-1', 'AA:BB', 'ble',"
        " NULL, '2025-01-01T00:00:00+00:00')"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with DeviceRegistry(path) as registry:
        (face,) = registry.list_devices()
        assert face.family == "ofcp"
        luna = registry.add(
            PairedDevice(
                name="luna",
                serial_number="foreo@C4:7F:51:0A:12:34",
                kind="massager",
                model="LUNA 3",
                transport="ble",
                last_address="C4:7F:51:0A:12:34",
                family="foreo",
            )
        )
        assert luna.family == "foreo"
        assert registry.get("luna").family == "foreo"
        assert registry.find_by_serial("foreo@C4:7F:51:0A:12:34") == registry.get("luna")
        # A device that reports no firmware version has no history to keep.
        assert registry.record_firmware("foreo@C4:7F:51:0A:12:34", "") is False
        assert registry.firmware_history("foreo@C4:7F:51:0A:12:34") == []
