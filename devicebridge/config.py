"""Settings from a TOML file, and where devicebridge keeps its files.

The file lives under the platform's user config directory (``config.toml``);
``DEVICEBRIDGE_CONFIG`` or ``--config`` point elsewhere. Every key is optional::

    simulate = false        # use the in-process simulator instead of Bluetooth
    sim_seed = 1234         # same seed -> same simulated devices (serial numbers)
    sim_massagers = 2
    sim_masks = 1
    sim_foreo = 0           # simulated FOREO devices (a LUNA 3 each; docs/devices.md)
    data_dir = "/path"      # where the registry lives
    scan_timeout_s = 5.0
    command_timeout_s = 2.0
    bridge_id = "bridge-7"  # this installation's name in MQTT topics (no '/', '+', '#')
    policy_file = "/path/policy.toml"  # the safety policy (default: the shipped one)
    device_catalogue_dir = "/path"     # more device families, one TOML file each (docs/devices.md)
    log_json = false        # `serve` logs JSON lines instead of text

    [mqtt]                  # optional: without it `serve` works locally only
    host = "broker.example" # required in the table
    port = 1883
    username = "bridge-7"
    password = "..."
    tls_ca_file = "/path/ca.pem"      # TLS when set (and tls_cert_file/tls_key_file)
    home_assistant_discovery = false

    [programs]              # signed programs pushed by therapists (docs/mqtt.md)
    max_validity_days = 30  # longer ones are refused by `serve` and `routine sign`

Errors name the file and the key, so a typo is found at once.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import platformdirs

from devicebridge.core.signed_program import DEFAULT_MAX_VALIDITY_DAYS
from devicebridge.errors import ConfigError

APP_NAME: Final = "devicebridge"
CONFIG_FILENAME: Final = "config.toml"
CONFIG_ENV: Final = "DEVICEBRIDGE_CONFIG"
DATA_DIR_ENV: Final = "DEVICEBRIDGE_DATA_DIR"
MAX_SIMULATED_DEVICES: Final = 64
MAX_PORT: Final = 65535
# MQTT 5 session expiry is a four-byte interval in seconds.
MQTT_MAX_SESSION_EXPIRY_S: Final = 0xFFFFFFFF
# A maximum validity above a year would make the limit meaningless (and nonces are kept
# for that long).
MAX_VALIDITY_DAYS_LIMIT: Final = 366


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """The ``[mqtt]`` table (docs/mqtt.md)."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    home_assistant_discovery: bool = False


@dataclass(frozen=True, slots=True)
class ProgramsConfig:
    """The ``[programs]`` table: signed programs pushed by therapists (docs/mqtt.md)."""

    max_validity_days: float = DEFAULT_MAX_VALIDITY_DAYS

    @property
    def max_validity(self) -> timedelta:
        return timedelta(days=self.max_validity_days)


@dataclass(frozen=True, slots=True)
class Settings:
    simulate: bool = False
    sim_seed: int = 1234
    sim_massagers: int = 2
    sim_masks: int = 1
    sim_foreo: int = 0
    data_dir: Path | None = None
    scan_timeout_s: float = 5.0
    command_timeout_s: float = 2.0
    bridge_id: str | None = None
    policy_file: Path | None = None
    device_catalogue_dir: Path | None = None
    log_json: bool = False
    mqtt: MqttConfig | None = None
    programs: ProgramsConfig = ProgramsConfig()


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / CONFIG_FILENAME


def config_path(override: Path | None = None) -> tuple[Path, bool]:
    """The config file to read and whether it was asked for explicitly (then it must exist)."""
    if override is not None:
        return override, True
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env), True
    return default_config_path(), False


def data_dir(override: Path | None = None, settings: Settings | None = None) -> Path:
    """Where the registry lives: parameter, then ``DEVICEBRIDGE_DATA_DIR``, then config, then
    the platform's user data directory.

    Only the path: the stores create it, private (0700, files 0600), when they first open
    it (:mod:`devicebridge.storage.files`).
    """
    if override is not None:
        return override
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env)
    if settings is not None and settings.data_dir is not None:
        return settings.data_dir
    return Path(platformdirs.user_data_dir(APP_NAME))


def _check_int(value: Any, key: str, path: Path, low: int, high: int) -> int:
    # bool is an int in Python; "simulate = 1" style mix-ups should be reported.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {value!r}", path=path, key=key)
    if not low <= value <= high:
        raise ConfigError(f"must be in {low}..{high}, got {value}", path=path, key=key)
    return value


def _check_positive_float(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"must be a positive number, got {value!r}", path=path, key=key)
    return float(value)


def parse_settings(document: dict[str, Any], path: Path) -> Settings:
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key not in known:
            raise ConfigError(
                f"unknown setting (known: {', '.join(sorted(known))})", path=path, key=key
            )
        if key == "mqtt":
            values[key] = _parse_mqtt(value, path)
        elif key == "programs":
            values[key] = _parse_programs(value, path)
        elif key == "bridge_id":
            if not isinstance(value, str) or not value or any(c in value for c in "/+#"):
                raise ConfigError(
                    f"must be a non-empty string without '/', '+' or '#', got {value!r}",
                    path=path,
                    key=key,
                )
            values[key] = value
        elif key in ("simulate", "log_json"):
            if not isinstance(value, bool):
                raise ConfigError(f"must be true or false, got {value!r}", path=path, key=key)
            values[key] = value
        elif key == "sim_seed":
            values[key] = _check_int(value, key, path, 0, 2**63 - 1)
        elif key in ("sim_massagers", "sim_masks", "sim_foreo"):
            values[key] = _check_int(value, key, path, 0, MAX_SIMULATED_DEVICES)
        elif key in ("data_dir", "policy_file", "device_catalogue_dir"):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"must be a path string, got {value!r}", path=path, key=key)
            values[key] = Path(value).expanduser()
        else:
            values[key] = _check_positive_float(value, key, path)
    return replace(Settings(), **values)


def _parse_mqtt(table: Any, path: Path) -> MqttConfig:
    if not isinstance(table, dict):
        raise ConfigError("must be a table ([mqtt])", path=path, key="mqtt")
    known = {f.name for f in fields(MqttConfig)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"mqtt.{key}"
        if key not in known:
            raise ConfigError(
                f"unknown setting (known: {', '.join(sorted(known))})", path=path, key=where
            )
        if key in ("host", "username", "password"):
            if not isinstance(value, str) or (key == "host" and not value):
                raise ConfigError(f"must be a string, got {value!r}", path=path, key=where)
            values[key] = value
        elif key == "port":
            values[key] = _check_int(value, where, path, 1, MAX_PORT)
        elif key == "keepalive_s":
            values[key] = _check_int(value, where, path, 1, 3600)
        elif key == "session_expiry_s":
            values[key] = _check_int(value, where, path, 0, MQTT_MAX_SESSION_EXPIRY_S)
        elif key == "home_assistant_discovery":
            if not isinstance(value, bool):
                raise ConfigError(f"must be true or false, got {value!r}", path=path, key=where)
            values[key] = value
        else:  # the TLS files
            if not isinstance(value, str) or not value:
                raise ConfigError(f"must be a path string, got {value!r}", path=path, key=where)
            values[key] = Path(value).expanduser()
    if "host" not in values:
        raise ConfigError("missing (the broker's host name)", path=path, key="mqtt.host")
    return MqttConfig(**values)


def _parse_programs(table: Any, path: Path) -> ProgramsConfig:
    if not isinstance(table, dict):
        raise ConfigError("must be a table ([programs])", path=path, key="programs")
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"programs.{key}"
        if key != "max_validity_days":
            raise ConfigError("unknown setting (known: max_validity_days)", path=path, key=where)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 < value <= MAX_VALIDITY_DAYS_LIMIT
        ):
            raise ConfigError(
                f"must be a number of days above 0 and at most {MAX_VALIDITY_DAYS_LIMIT},"
                f" got {value!r}",
                path=path,
                key=where,
            )
        values[key] = float(value)
    return ProgramsConfig(**values)


def load_settings(override: Path | None = None) -> tuple[Settings, Path]:
    """Read the config file; a missing default file means default settings."""
    path, explicit = config_path(override)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError("config file not found", path=path) from None
        return Settings(), path
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from exc
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from exc
    return parse_settings(document, path), path
