"""Service and therapist commands: ``serve``, ``status``, ``therapist ...``, ``trust ...``,
and ``routine sign`` / ``routine push`` (added to the ``routine`` group of cli/routines.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.table import Table

from devicebridge.app import App
from devicebridge.cli.base import CliContext, fmt, main, pass_cli, reports_errors, run
from devicebridge.cli.routines import routine_group
from devicebridge.config import MqttConfig, Settings
from devicebridge.core.policy import SafetyPolicy, default_policy, parse_policy
from devicebridge.core.routine import Routine, RoutineError, parse_routine
from devicebridge.core.signed_program import (
    FORMAT,
    ProgramRejectedError,
    check_validity_period,
    key_id,
    load_public_key,
    parse_envelope,
    public_key_bytes,
    sign_program,
)
from devicebridge.device.transport.ble import kind_label
from devicebridge.errors import ConfigError, ServiceError, TherapistKeyError
from devicebridge.integrations.mqtt import MqttSettings, Topics, read_retained, request_reply
from devicebridge.service.logs import configure_logging
from devicebridge.service.status import read_status_file
from devicebridge.service.supervisor import BridgeService
from devicebridge.storage import lock as bridge_lock
from devicebridge.storage.files import PRIVATE_FILE_MODE
from devicebridge.storage.keys import key_path, load_private_key, private_key_dir
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
from devicebridge.storage.registry import PairedDevice

DEFAULT_THERAPIST_ID: Final = "therapist"
DEFAULT_VALID_DAYS: Final = 7
DEFAULT_ACK_TIMEOUT_S: Final = 30.0
DEFAULT_READ_TIMEOUT_S: Final = 5.0
SIMULATED_SCAN_S: Final = 2.0
# With --simulate, a simulated hand follows each routine from this long after it starts.
SIMULATED_HAND_LEAD_IN_S: Final = 1.0


# --------------------------------------------------------------------------- helpers


def parse_broker(text: str, option: str = "--broker") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, 1883
    try:
        number = int(port)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not HOST:PORT", param_hint=option) from None
    if not 0 < number < 65536:
        raise click.BadParameter(f"port {number} is out of range", param_hint=option)
    return host, number


def mqtt_settings(
    config: MqttConfig | None,
    broker: str | None,
    *,
    username: str | None = None,
    password: str | None = None,
    tls_ca_file: Path | None = None,
) -> MqttSettings | None:
    """The broker to use: ``--broker`` (and credentials) over the ``[mqtt]`` table."""
    if broker is None and config is None:
        return None
    base = config or MqttConfig(host="localhost")
    host, port = parse_broker(broker) if broker else (base.host, base.port)
    return MqttSettings(
        host=host,
        port=port,
        username=username if username is not None else base.username,
        password=password if password is not None else base.password,
        tls_ca_file=tls_ca_file or base.tls_ca_file,
        tls_cert_file=base.tls_cert_file,
        tls_key_file=base.tls_key_file,
        keepalive_s=base.keepalive_s,
        session_expiry_s=base.session_expiry_s,
    )


def default_bridge_id() -> str:
    """``bridge-<hostname>``, with only characters a topic level may carry."""
    host = socket.gethostname().split(".")[0] or "local"
    return "bridge-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in host)


def load_policy(settings: Settings) -> SafetyPolicy:
    if settings.policy_file is None:
        return default_policy()
    try:
        text = settings.policy_file.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc}", path=settings.policy_file) from exc
    try:
        return parse_policy(text, label=str(settings.policy_file))
    except ValueError as exc:
        raise ConfigError(str(exc), path=settings.policy_file) from exc


def open_programs(cli: CliContext) -> ProgramStore:
    app = App(cli.options)
    return ProgramStore(app.data_dir / PROGRAMS_FILENAME)


broker_options = [
    click.option("--broker", required=True, help="The MQTT broker, HOST:PORT."),
    click.option("--username", default=None, help="MQTT user name."),
    click.option("--password", default=None, envvar="DEVICEBRIDGE_MQTT_PASSWORD"),
    click.option(
        "--tls-ca-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        help="CA certificate: connect with TLS.",
    ),
]


def with_broker_options(func: Any) -> Any:
    for option in reversed(broker_options):
        func = option(func)
    return func


# --------------------------------------------------------------------------- serve


@main.command("serve")
@click.option("--bridge-id", default=None, help="This bridge's id in MQTT topics (config).")
@click.option("--broker", default=None, help="MQTT broker HOST:PORT (overrides [mqtt]).")
@click.option("--log-json", is_flag=True, default=None, help="Log JSON lines (config log_json).")
@click.option(
    "--run",
    "run_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Run this routine file once on --device when it connects (recorded as a session).",
)
@click.option("--device", default=None, help="Device (name or serial) for --run.")
@pass_cli
@reports_errors
def serve_command(
    cli: CliContext,
    bridge_id: str | None,
    broker: str | None,
    log_json: bool | None,
    run_file: Path | None,
    device: str | None,
) -> None:
    """Keep the paired devices connected, record sessions, talk to the MQTT broker."""
    settings = cli.options.settings
    level = logging.getLogger().getEffectiveLevel()
    configure_logging(
        min(level, logging.INFO),
        json_lines=settings.log_json if log_json is None else log_json,
    )
    policy = load_policy(settings)
    routine = None
    if run_file is not None:
        try:
            routine = parse_routine(run_file.read_text("utf-8"), policy, label=str(run_file))
        except RoutineError as exc:
            raise click.ClickException(str(exc)) from None
    mqtt = mqtt_settings(settings.mqtt, broker)
    bid = bridge_id or settings.bridge_id or default_bridge_id()
    Topics(bid)  # a bad id fails here, before anything starts

    async def go() -> None:
        async with App(cli.options) as app:
            devices = await _devices_to_serve(app)

            def guide_hand(serial: str, started: Routine) -> None:
                # --simulate: the simulated hand follows each routine that starts.
                app.script_simulated_hand(
                    serial, started, policy, lead_in_s=SIMULATED_HAND_LEAD_IN_S
                )

            service = BridgeService(
                bridge_id=bid,
                data_dir=app.data_dir,
                policy=policy,
                clock=app.clock,
                devices=devices,
                session_factory=lambda p: app.session(app.transport_for(p), p.kind, name=p.name),
                mqtt=mqtt,
                home_assistant=bool(settings.mqtt and settings.mqtt.home_assistant_discovery),
                rng=app.rng,
                on_routine_started=guide_hand if app.options.simulate else None,
                max_validity=settings.programs.max_validity,
            )
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, service.request_stop)
            task = asyncio.create_task(service.run())
            await service.wait_started()
            if routine is not None:
                target = _pick_device(devices, routine.device_kind.value, device)
                service.start_routine(target.serial_number, routine)
            await task

    # One bridge per data directory, refused before anything starts (held until exit).
    with bridge_lock.acquire(App(cli.options).data_dir):
        run(go())


async def _devices_to_serve(app: App) -> list[PairedDevice]:
    with app.open_registry() as registry:
        devices = registry.list_devices()
    if devices or not app.options.simulate:
        return devices
    # A simulated world with nothing paired: serve what it has (demos and tests).
    found = await app.scan(SIMULATED_SCAN_S)
    return [
        PairedDevice(
            name=d.name,
            serial_number=d.serial_number or d.address,
            kind=kind_label(d.kind),
            model="simulated",
            transport="ble",
            last_address=d.address,
        )
        for d in found
    ]


def _pick_device(devices: list[PairedDevice], kind: str, wanted: str | None) -> PairedDevice:
    for paired in devices:
        if wanted in (paired.name, paired.serial_number) or (
            wanted is None and paired.kind == kind
        ):
            return paired
    raise ServiceError(f"no {'device ' + wanted if wanted else kind} among the served devices")


# --------------------------------------------------------------------------- status


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status file as JSON.")
@pass_cli
@reports_errors
def status_command(cli: CliContext, as_json: bool) -> None:
    """Whether `devicebridge serve` runs here, its devices and its broker link."""
    data_dir = App(cli.options).data_dir
    status = read_status_file(data_dir)
    if status is None:
        raise ServiceError(f"the service has never run with data dir {data_dir}")
    if as_json:
        click.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    last = status.get("state", "unknown")
    if status["alive"]:
        state = f"running, pid {status['pid']}"
    elif last == "running":
        state = f"not running (last: running); pid {status.get('pid')} ended without a clean stop"
    else:
        state = f"not running (last: {last})"
    if last == "starting":
        cli.console.print(f"bridge: {state}; starting, no status written yet", highlight=False)
        return
    mqtt = status["mqtt"]
    link = (
        f"{mqtt['host']}:{mqtt['port']} {'connected' if mqtt['connected'] else 'disconnected'}"
        if mqtt["configured"]
        else "no broker configured"
    )
    cli.console.print(
        f"bridge {status['bridge_id']}: {state}, updated {status['updated_at']}\n"
        f"MQTT: {link}; outbox: {status['outbox_depth']} waiting",
        highlight=False,
    )
    table = Table(title="Devices")
    for column in ("serial", "name", "kind", "state", "battery", "session"):
        table.add_column(column)
    for d in status["devices"]:
        battery = d["battery_percent"]
        table.add_row(
            d["serial"],
            d["name"],
            d["kind"],
            d["state"],
            "-" if battery is None else f"{battery}%",
            fmt(d["session_id"]),
        )
    cli.console.print(table if status["devices"] else "No devices.")


# --------------------------------------------------------------------------- therapist


@main.group("therapist")
def therapist_group() -> None:
    """For therapists: signing keys and adherence of their clients' bridges."""


@therapist_group.command("keygen")
@click.option("--id", "therapist_id", default=DEFAULT_THERAPIST_ID, show_default=True)
@reports_errors
def keygen_command(therapist_id: str) -> None:
    """Create an Ed25519 signing key; print the public key to give to clients."""
    path = key_path(therapist_id)
    private_key_dir()
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # Created with 0600 from the start: never readable by others, not even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        raise TherapistKeyError("a key with this id exists already", path=path) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = base64.b64encode(public_key_bytes(key.public_key())).decode()
    click.echo(f"private key: {path}")
    click.echo(f"public key:  {public}")
    click.echo(f"key id:      {key_id(key.public_key())}")
    click.echo(f"clients run: devicebridge trust add {public} --therapist {therapist_id}")


@therapist_group.command("status")
@click.argument("bridge_id")
@with_broker_options
@click.option("--timeout-s", type=float, default=DEFAULT_READ_TIMEOUT_S, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@reports_errors
def therapist_status_command(
    cli: CliContext,
    bridge_id: str,
    broker: str,
    username: str | None,
    password: str | None,
    tls_ca_file: Path | None,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Programs installed on BRIDGE_ID and the sessions run with them."""
    settings = mqtt_settings(
        None, broker, username=username, password=password, tls_ca_file=tls_ca_file
    )
    assert settings is not None
    topics = Topics(bridge_id)
    found = run(
        read_retained(
            settings,
            [topics.programs_installed, topics.availability],
            wait_for=topics.programs_installed,
            timeout_s=timeout_s,
        )
    )
    raw = found.get(topics.programs_installed)
    if raw is None:
        raise ServiceError(f"bridge {bridge_id} has published no programs (within {timeout_s} s)")
    adherence = json.loads(raw)
    availability = found.get(topics.availability, b"unknown").decode()
    if as_json:
        click.echo(json.dumps({**adherence, "availability": availability}, indent=2))
        return
    cli.console.print(f"bridge {bridge_id}: {availability}", highlight=False)
    programs = Table(title="Programs")
    for column in ("id", "routine", "version", "therapist", "installed on", "pending", "expires"):
        programs.add_column(column)
    for p in adherence["programs"]:
        programs.add_row(
            str(p["program_id"]),
            p["routine"],
            p["program_version"],
            p["therapist_id"],
            ", ".join(p["installed_on"]) or "-",
            ", ".join(p["pending_on"]) or "-",
            p["expires_at"][:16],
        )
    cli.console.print(programs)
    sessions = Table(title="Sessions run with these programs")
    for column in (
        "session",
        "program",
        "device",
        "started",
        "status",
        "completion",
        "in band",
        "dose J/cm²",
    ):
        sessions.add_column(column)
    for s in adherence["sessions"]:
        summary = s["summary"]
        dose = summary.get("dose_j_cm2")
        sessions.add_row(
            str(s["session_id"]),
            fmt(s["program_id"]),
            s["serial"],
            s["started_at"][:16],
            s["status"],
            _percent(summary.get("completion")),
            _percent(summary.get("in_band_fraction")),
            ", ".join(f"{k} {v:.1f}" for k, v in dose.items() if v) if dose else "-",
        )
    cli.console.print(sessions if adherence["sessions"] else "No sessions with these programs yet.")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


# --------------------------------------------------------------------------- trust


@main.group("trust")
def trust_group() -> None:
    """Therapist keys this bridge accepts signed programs from."""


@trust_group.command("add")
@click.argument("public_key")
@click.option("--therapist", "therapist_id", required=True, help="Who this key belongs to.")
@pass_cli
@reports_errors
def trust_add_command(cli: CliContext, public_key: str, therapist_id: str) -> None:
    """Trust PUBLIC_KEY (base64, from `devicebridge therapist keygen`) for one therapist.

    Programs signed with it are accepted only under that therapist id; a key already
    trusted for another therapist is refused (remove it first).
    """
    try:
        key = load_public_key(public_key)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="PUBLIC_KEY") from None
    store = open_programs(cli)
    try:
        kid = key_id(key)
        store.trust(kid, therapist_id, base64.b64encode(public_key_bytes(key)).decode())
    finally:
        store.close()
    click.echo(f"trusted key {kid} of {therapist_id}")


@trust_group.command("list")
@pass_cli
@reports_errors
def trust_list_command(cli: CliContext) -> None:
    """The trusted therapist keys."""
    store = open_programs(cli)
    try:
        keys = store.trusted_keys()
    finally:
        store.close()
    table = Table(title="Trusted therapist keys")
    for column in ("key id", "therapist", "public key", "added"):
        table.add_column(column)
    for k in keys:
        table.add_row(k.key_id, k.therapist_id, k.public_key, k.added_at.isoformat()[:16])
    cli.console.print(table if keys else "No trusted keys (devicebridge trust add).")


@trust_group.command("remove")
@click.argument("key_id_")
@pass_cli
@reports_errors
def trust_remove_command(cli: CliContext, key_id_: str) -> None:
    """Stop trusting KEY_ID."""
    store = open_programs(cli)
    try:
        removed = store.distrust(key_id_)
    finally:
        store.close()
    if not removed:
        raise ServiceError(f"no trusted key {key_id_} (devicebridge trust list)")
    click.echo(f"removed key {key_id_}")


# --------------------------------------------------------------------------- routine sign/push


def sign_file(
    path: Path,
    *,
    client: str,
    therapist_id: str | None,
    valid_days: float,
    version: str | None,
    max_validity: timedelta,
) -> bytes:
    """Check the routine against the shipped policy, then sign it for ``client``."""
    try:
        Topics(client)  # a bridge id that could not be a topic level is refused early
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--client") from None
    try:
        # Bridges refuse programs valid for longer than their maximum (the same rule).
        check_validity_period(timedelta(days=valid_days), max_validity)
    except ProgramRejectedError as exc:
        raise click.BadParameter(exc.message, param_hint="--valid-days") from None
    program = path.read_bytes()
    try:
        routine = parse_routine(program.decode("utf-8"), default_policy(), label=str(path))
    except (RoutineError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path} is not a valid routine:\n{exc}") from None
    therapist, key = load_private_key(therapist_id)
    signed = sign_program(
        key,
        program,
        therapist_id=therapist,
        client_id=client,
        program_version=version or routine.version or "1",
        issued_at=datetime.now(UTC),
        valid_for=timedelta(days=valid_days),
    )
    return signed.to_json()


@routine_group.command("sign")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--client", required=True, help="The client's bridge id.")
@click.option("--therapist", "therapist_id", default=None, help="Key to sign with (keygen --id).")
@click.option(
    "--valid-days",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_VALID_DAYS,
    show_default=True,
    help="How long the program stays valid (at most [programs] max_validity_days).",
)
@click.option("--version", default=None, help="Program version (default: the routine's).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@pass_cli
@reports_errors
def sign_command(
    cli: CliContext,
    file: Path,
    client: str,
    therapist_id: str | None,
    valid_days: float,
    version: str | None,
    output: Path,
) -> None:
    """Sign routine FILE for one client's bridge; write the envelope to OUTPUT."""
    envelope = sign_file(
        file,
        client=client,
        therapist_id=therapist_id,
        valid_days=valid_days,
        version=version,
        max_validity=cli.options.settings.programs.max_validity,
    )
    output.write_bytes(envelope)
    meta = json.loads(envelope)["metadata"]
    click.echo(f"signed {file.name} for {client}: {output} (expires {meta['expires_at']})")


async def push_envelope(
    settings: MqttSettings, bridge_id: str, envelope: bytes, *, timeout_s: float
) -> dict[str, Any] | None:
    """Publish a signed envelope to the bridge and wait for its acknowledgement (by nonce).

    An envelope whose nonce the bridge could not read (not JSON, too large, no nonce) is
    refused here with :class:`ProgramRejectedError`: the bridge would drop it unanswered.
    """
    try:
        nonce = parse_envelope(envelope).metadata.nonce
    except ProgramRejectedError as exc:
        if exc.nonce is None:
            raise ProgramRejectedError(
                exc.reason,
                f"not pushed: the bridge would drop it without an answer ({exc.message})",
            ) from None
        nonce = exc.nonce  # the bridge answers with the reason
    topics = Topics(bridge_id)

    def is_ours(payload: bytes) -> bool:
        try:
            return bool(json.loads(payload).get("nonce") == nonce)
        except (ValueError, AttributeError):
            return False

    answer = await request_reply(
        settings,
        topic=topics.program_push,
        payload=envelope,
        reply_topic=topics.program_ack,
        is_reply=is_ours,
        timeout_s=timeout_s,
    )
    return None if answer is None else dict(json.loads(answer))


@routine_group.command("push")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--client", required=True, help="The client's bridge id.")
@with_broker_options
@click.option("--therapist", "therapist_id", default=None, help="Key to sign a routine with.")
@click.option(
    "--valid-days",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_VALID_DAYS,
    show_default=True,
    help="When signing: how long the program stays valid (at most max_validity_days).",
)
@click.option("--timeout-s", type=float, default=DEFAULT_ACK_TIMEOUT_S, show_default=True)
@pass_cli
@reports_errors
def push_command(
    cli: CliContext,
    file: Path,
    client: str,
    broker: str,
    username: str | None,
    password: str | None,
    tls_ca_file: Path | None,
    therapist_id: str | None,
    valid_days: float,
    timeout_s: float,
) -> None:
    """Push FILE (a signed envelope, or a routine to sign now) to a client's bridge."""
    data = file.read_bytes()
    if not _is_envelope(data):
        data = sign_file(
            file,
            client=client,
            therapist_id=therapist_id,
            valid_days=valid_days,
            version=None,
            max_validity=cli.options.settings.programs.max_validity,
        )
    settings = mqtt_settings(
        None, broker, username=username, password=password, tls_ca_file=tls_ca_file
    )
    assert settings is not None
    ack = run(push_envelope(settings, client, data, timeout_s=timeout_s))
    if ack is None:
        click.echo(
            f"no answer from bridge {client} within {timeout_s:g} s: if it is offline, the"
            " broker keeps the push until it reconnects (see `devicebridge therapist status`)"
        )
        raise click.exceptions.Exit(1)
    if ack["status"] == "accepted":
        click.echo(
            f"accepted: program {ack['program_id']} ({ack['routine']} v{ack['program_version']})"
            f" on bridge {client}"
        )
        return
    click.echo(f"rejected: {ack['reason']}: {ack['detail']}")
    raise click.exceptions.Exit(1)


def _is_envelope(data: bytes) -> bool:
    try:
        return bool(json.loads(data).get("format") == FORMAT)
    except (ValueError, AttributeError):
        return False
