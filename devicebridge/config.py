"""Settings from a TOML file, and where devicebridge keeps its files.

The file lives under the platform's user config directory (``config.toml``, see
``devicebridge config path``); ``DEVICEBRIDGE_CONFIG`` or ``--config`` point elsewhere.
Every key is optional. The dataclasses below are the one definition of every key, its
default and its meaning: ``docs/config.md`` is generated from them
(``python -m devicebridge.config > docs/config.md``; a test fails when it drifts), and
``devicebridge config show`` prints the values in force.

Errors name the file and the key (and the closest known key for a typo), so a mistake is
found at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from devicebridge.errors import ConfigError

if TYPE_CHECKING:
    import ssl

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
TOPIC_ROOT: Final = "devicebridge/v1"


def doc(text: str, *, in_file: bool = True) -> dict[str, Any]:
    """A field's meaning, and whether the file may set it (docs/config.md is made of these)."""
    return {"doc": text, "in_file": in_file}


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """The MQTT broker and how to use it: the ``[mqtt]`` table, ``--broker`` and friends.

    One dataclass for the bridge (``serve``), the therapists' commands and the clinic
    console; the fields marked ``in_file=False`` are for code and tests only.
    """

    host: str = field(metadata=doc("The broker's host name or address (required)."))
    port: int = field(default=1883, metadata=doc(f"The broker's port (1..{MAX_PORT})."))
    username: str | None = field(
        default=None, metadata=doc("User name (the broker's access control).")
    )
    password: str | None = field(
        default=None,
        metadata=doc("Password (or DEVICEBRIDGE_MQTT_PASSWORD for the therapists' commands)."),
    )
    tls_ca_file: Path | None = field(
        default=None, metadata=doc("CA certificate: connect with TLS when set.")
    )
    tls_cert_file: Path | None = field(
        default=None, metadata=doc("Client certificate for TLS (optional).")
    )
    tls_key_file: Path | None = field(
        default=None, metadata=doc("The client certificate's private key.")
    )
    tls_insecure_skip_verify: bool = field(
        default=False, metadata=doc("Accept any broker certificate (tests only).", in_file=False)
    )
    keepalive_s: int = field(default=30, metadata=doc("MQTT keep-alive in seconds (1..3600)."))
    client_id: str | None = field(
        default=None, metadata=doc("Client id (default: devicebridge-<bridge_id>).", in_file=False)
    )
    # How long the broker keeps the bridge's subscriptions, and the program pushes that
    # arrive meanwhile, while the bridge is offline (0: forget them at once).
    session_expiry_s: int = field(
        default=7 * 24 * 3600,
        metadata=doc(
            "How long the broker keeps the bridge's session, and the programs pushed while it "
            "is offline (seconds; 0 forgets them at once)."
        ),
    )
    topic_root: str = field(
        default=TOPIC_ROOT, metadata=doc("The root of every topic.", in_file=False)
    )
    reconnect_initial_s: float = field(
        default=0.5, metadata=doc("First reconnect pause.", in_file=False)
    )
    reconnect_max_s: float = field(
        default=30.0, metadata=doc("Longest reconnect pause.", in_file=False)
    )
    home_assistant_discovery: bool = field(
        default=False, metadata=doc("`serve` also publishes Home Assistant discovery messages.")
    )

    def tls_context(self) -> ssl.SSLContext | None:
        if self.tls_ca_file is None and self.tls_cert_file is None:
            return None
        import ssl

        context = ssl.create_default_context(
            cafile=str(self.tls_ca_file) if self.tls_ca_file else None
        )
        if self.tls_cert_file is not None:
            context.load_cert_chain(
                str(self.tls_cert_file), str(self.tls_key_file) if self.tls_key_file else None
            )
        if self.tls_insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


@dataclass(frozen=True, slots=True)
class ProgramsConfig:
    """The ``[programs]`` table: signed programs pushed by therapists (docs/mqtt.md)."""

    # None: the default of core/signed_program.py (DEFAULT_MAX_VALIDITY_DAYS), read when
    # needed so that loading the configuration does not load the signing code.
    max_validity_days: float | None = field(
        default=None,
        metadata=doc(
            "Longest validity of a signed program, in days (above 0, at most "
            f"{MAX_VALIDITY_DAYS_LIMIT}): longer ones are refused by `serve` and `routine sign`."
        ),
    )

    @property
    def validity_days(self) -> float:
        """The maximum in force: the file's, or the default."""
        if self.max_validity_days is not None:
            return self.max_validity_days
        from devicebridge.core.signed_program import DEFAULT_MAX_VALIDITY_DAYS

        return DEFAULT_MAX_VALIDITY_DAYS

    @property
    def max_validity(self) -> timedelta:
        return timedelta(days=self.validity_days)


@dataclass(frozen=True, slots=True)
class Settings:
    """The configuration file's top level."""

    simulate: bool = field(
        default=False, metadata=doc("Use in-process simulated devices instead of Bluetooth.")
    )
    sim_seed: int = field(
        default=1234, metadata=doc("Seed of the simulated devices: same seed, same devices.")
    )
    sim_massagers: int = field(
        default=2,
        metadata=doc(f"Simulated massagers (0..{MAX_SIMULATED_DEVICES}, a sanity bound)."),
    )
    sim_masks: int = field(
        default=1, metadata=doc(f"Simulated LED masks (0..{MAX_SIMULATED_DEVICES}).")
    )
    sim_foreo: int = field(
        default=0,
        metadata=doc(
            f"Simulated FOREO devices, a LUNA 3 each (0..{MAX_SIMULATED_DEVICES}; docs/devices.md)."
        ),
    )
    data_dir: Path | None = field(
        default=None,
        metadata=doc(
            "Where devicebridge keeps its data (default: the platform's user data directory; "
            "DEVICEBRIDGE_DATA_DIR and --data-dir come first)."
        ),
    )
    scan_timeout_s: float = field(
        default=5.0, metadata=doc("How long a scan, or a search for a device, lasts.")
    )
    command_timeout_s: float = field(
        default=2.0, metadata=doc("How long a device has to acknowledge a command.")
    )
    bridge_id: str | None = field(
        default=None,
        metadata=doc(
            "This bridge's name in MQTT topics (no '/', '+' or '#'; default: bridge-<hostname>)."
        ),
    )
    policy_file: Path | None = field(
        default=None,
        metadata=doc("The safety policy file (default: the shipped one; docs/policy.md)."),
    )
    device_catalogue_dir: Path | None = field(
        default=None,
        metadata=doc(
            "More device families, one TOML file each, checked with the shipped ones "
            "(docs/devices.md)."
        ),
    )
    log_json: bool = field(default=False, metadata=doc("`serve` logs JSON lines instead of text."))
    mqtt: MqttSettings | None = field(
        default=None, metadata=doc("The broker (without it `serve` works locally only).")
    )
    programs: ProgramsConfig = field(
        default_factory=ProgramsConfig, metadata=doc("Signed programs (docs/mqtt.md).")
    )


def default_config_path() -> Path:
    import platformdirs

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
    import platformdirs

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
    known = file_keys(Settings)
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key not in known:
            raise ConfigError(_unknown(key, known), path=path, key=key)
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


def file_keys(cls: type[Any]) -> list[str]:
    """The keys a configuration table may hold (the dataclass fields marked ``in_file``)."""
    return [f.name for f in fields(cls) if f.metadata.get("in_file", True)]


def _unknown(key: str, known: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown setting (known: {', '.join(sorted(known))}){hint}"


def _parse_mqtt(table: Any, path: Path) -> MqttSettings:
    if not isinstance(table, dict):
        raise ConfigError("must be a table ([mqtt])", path=path, key="mqtt")
    known = file_keys(MqttSettings)
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"mqtt.{key}"
        if key not in known:
            raise ConfigError(_unknown(key, known), path=path, key=where)
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
    return MqttSettings(**values)


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
    import tomllib

    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from exc
    return parse_settings(document, path), path


# --------------------------------------------------------------------------- reference


def _default_text(f: Any) -> str:
    if f.default is MISSING:
        return "(required)"
    value = f.default
    if f.name == "max_validity_days":
        value = ProgramsConfig().validity_days
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _type_text(f: Any) -> str:
    return str(f.type).replace("Path", "path").replace(" | None", "")


def reference_markdown() -> str:
    """docs/config.md: where the file lives and every key with its default and meaning."""
    lines = [
        "# Configuration file",
        "",
        "<!-- Generated from devicebridge/config.py by `python -m devicebridge.config`;",
        "     tests/cli/test_config_docs.py fails when this file and the code disagree. -->",
        "",
        "devicebridge reads one TOML file. Where it is, in this order:",
        "",
        "1. `--config FILE` (then the file must exist);",
        f"2. the environment variable `{CONFIG_ENV}` (the same);",
        f"3. `{CONFIG_FILENAME}` in the platform's user config directory (on Linux",
        "   `~/.config/devicebridge/config.toml`); a missing file there means all defaults.",
        "",
        "`devicebridge config path` prints the file in use and whether it exists;",
        "`devicebridge config show` prints every setting in force and where its value came",
        "from (`--json` for scripts). Every key is optional. A key the file may not hold, a",
        "value of the wrong type or out of range is an error that names the file and the key.",
        "",
        "```toml",
        "simulate = false",
        'bridge_id = "bridge-7"',
        "",
        "[mqtt]",
        'host = "mqtt.clinic"',
        "port = 8883",
        'tls_ca_file = "/etc/devicebridge/ca.pem"',
        "",
        "[programs]",
        "max_validity_days = 30",
        "```",
        "",
    ]
    tables: list[tuple[str, type[Any]]] = [
        ("Top level", Settings),
        ("`[mqtt]`", MqttSettings),
        ("`[programs]`", ProgramsConfig),
    ]
    for title, cls in tables:
        lines += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            if not f.metadata.get("in_file", True):
                continue
            if f.name in ("mqtt", "programs"):
                kind, default = "table", "(none)" if f.name == "mqtt" else "(defaults)"
            else:
                kind, default = _type_text(f), _default_text(f)
            lines.append(f"| `{f.name}` | {kind} | {default} | {f.metadata['doc']} |")
        lines.append("")
    lines += [
        "Paths may start with `~`. The data directory (`data_dir`, `--data-dir`,",
        f"`{DATA_DIR_ENV}`) holds the device registry, sessions, programs, the outbox, the",
        "status of a running bridge, and the flash of simulated devices; it is private (the",
        "folder 0700, every file 0600). Therapists' signing keys are not a bridge's data:",
        "`devicebridge therapist keygen` keeps them in the user config directory (`keys/`, or",
        "`DEVICEBRIDGE_KEY_DIR`), whatever the data directory, so that one key signs for",
        "every data directory of the therapist's machine.",
        "",
        "A session's telemetry is stored as it arrives, raw; once the session has ended, a",
        "background process (`python -m devicebridge.storage.compactor`, at the lowest OS",
        "priority) rewrites it compressed, about a quarter of the size. It waits for a pause",
        "in the telemetry the bridge writes, so as not to compete with live devices, and for",
        "no longer than a set time after the session ended (`COMPACT_IDLE_S` and",
        "`COMPACT_WAIT_S` in `devicebridge/storage/writer.py`); a command that ends waits for",
        "it. A session that could not be compacted keeps its raw chunks: they read the same.",
        "",
        f"The simulated device counts are bounded ({MAX_SIMULATED_DEVICES} each) as a sanity",
        "check of the file; fleets larger than that are a QA matter: scenarios",
        "(`devicebridge-sim scenario run`, docs/qa.md) run hundreds of devices.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
