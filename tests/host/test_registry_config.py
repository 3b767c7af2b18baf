"""The paired-device registry on real SQLite files, and the TOML settings."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devicebridge.config import Settings, data_dir, load_settings
from devicebridge.errors import (
    AlreadyPairedError,
    ConfigError,
    DuplicateNameError,
    RegistryError,
    RegistrySchemaError,
    UnknownDeviceError,
)
from devicebridge.storage.registry import SCHEMA_VERSION, DeviceRegistry, PairedDevice


class StepClock:
    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def massager(name: str = "left", serial: str = "FM-0001") -> PairedDevice:
    return PairedDevice(name, serial, "massager", "FM-1", "ble", last_address="SI:MU:00:00:00:01")


def test_pair_list_get_forget_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "data" / "registry.sqlite3"
    with DeviceRegistry(path, now=StepClock()) as registry:
        stored = registry.add(massager())
        assert stored.paired_at is not None
        registry.add(PairedDevice("mask", "LM-0001", "led_mask", "LM-1", "serial", None, "/dev/x"))
    # A second process (here: a second connection) sees the same data.
    with DeviceRegistry(path) as registry:
        assert [d.name for d in registry.list_devices()] == ["left", "mask"]
        assert registry.get("left") == stored
        assert registry.get("mask").serial_port == "/dev/x"
        assert registry.find_by_serial("LM-0001") is not None
        registry.remove("left")
        with pytest.raises(UnknownDeviceError, match="left"):
            registry.get("left")
        with pytest.raises(UnknownDeviceError):
            registry.remove("left")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


def test_duplicate_name_and_serial_already_paired(tmp_path: Path) -> None:
    with DeviceRegistry(tmp_path / "r.sqlite3") as registry:
        registry.add(massager())
        with pytest.raises(DuplicateNameError) as dup:
            registry.add(massager("left", "FM-0002"))
        assert dup.value.existing_serial == "FM-0001"
        with pytest.raises(AlreadyPairedError) as again:
            registry.add(massager("right", "FM-0001"))
        assert again.value.existing_name == "left"
        assert isinstance(again.value, RegistryError)
        assert len(registry.list_devices()) == 1  # nothing half-written


def test_firmware_history_records_each_version_once(tmp_path: Path) -> None:
    with DeviceRegistry(tmp_path / "r.sqlite3", now=StepClock()) as registry:
        registry.add(massager())
        assert registry.record_firmware("FM-0001", "1.0.0")
        assert not registry.record_firmware("FM-0001", "1.0.0")
        assert registry.record_firmware("FM-0001", "1.1.0")
        history = registry.firmware_history("FM-0001")
        assert [h.version for h in history] == ["1.0.0", "1.1.0"]
        assert history[0].first_seen_at < history[1].first_seen_at
        assert registry.current_firmware("FM-0001") == "1.1.0"
        with pytest.raises(RegistryError, match="FM-9999"):
            registry.record_firmware("FM-9999", "1.0.0")
        registry.remove("left")
        assert registry.firmware_history("FM-0001") == []


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RegistrySchemaError, match="newer"):
        DeviceRegistry(path)


def test_not_a_database_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match=str(path)):
        DeviceRegistry(path)


def test_settings_from_toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('simulate = true\nsim_seed = 7\nsim_masks = 2\ndata_dir = "/tmp/x"\n')
    settings, path = load_settings(config)
    assert path == config
    assert settings == Settings(simulate=True, sim_seed=7, sim_masks=2, data_dir=Path("/tmp/x"))
    monkeypatch.setenv("DEVICEBRIDGE_CONFIG", str(config))
    assert load_settings()[0].sim_seed == 7
    config.write_text('[mqtt]\nhost = "broker"\nsession_expiry_s = 3600\n')
    mqtt = load_settings(config)[0].mqtt
    assert mqtt is not None
    assert mqtt.session_expiry_s == 3600
    monkeypatch.setenv("DEVICEBRIDGE_DATA_DIR", str(tmp_path / "env"))
    assert data_dir(None, settings) == tmp_path / "env"
    assert data_dir(tmp_path / "param", settings) == tmp_path / "param"


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("simulate = 1\n", "simulate", "true or false"),
        ("sim_seed = 'x'\n", "sim_seed", "integer"),
        ("sim_masks = 1000\n", "sim_masks", "0..64"),
        ("simulte = true\n", "simulte", "unknown setting"),
        ("scan_timeout_s = -1\n", "scan_timeout_s", "positive"),
        ('[mqtt]\nhost = "b"\nsession_expiry_s = -5\n', "mqtt.session_expiry_s", "0.."),
    ],
)
def test_config_errors_name_the_key_and_the_file(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(config)
    assert info.value.key == key
    assert str(config) in str(info.value)
    assert key in str(info.value)


def test_bad_toml_and_missing_explicit_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("simulate = = true\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")
