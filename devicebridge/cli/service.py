"""Service and therapist commands: ``serve``, ``status``, ``therapist ...``, ``trust ...``,
and ``routine sign`` / ``routine push`` (loaded into the ``routine`` group on use).

``status`` and ``trust ...`` read files and stores only; ``serve``, the signing commands
and the broker commands import the service, cryptography and aiomqtt inside their
functions.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from devicebridge.cli.base import (
    POSITIVE_S,
    CliContext,
    echo_json,
    fmt,
    pass_cli,
    reports_errors,
    run,
    writable_data_dir,
)
from devicebridge.cli.table import Table
from devicebridge.cli.words import kind_words
from devicebridge.config import MqttSettings, Settings
from devicebridge.errors import CliInputError, ConfigError, ServiceError

if TYPE_CHECKING:
    from devicebridge.app import App
    from devicebridge.core.policy import SafetyPolicy
    from devicebridge.storage.programs import ProgramStore
    from devicebridge.storage.registry import PairedDevice

DEFAULT_THERAPIST_ID: Final = "therapist"
DEFAULT_VALID_DAYS: Final = 7
DEFAULT_ACK_TIMEOUT_S: Final = 30.0
DEFAULT_READ_TIMEOUT_S: Final = 5.0
SIMULATED_SCAN_S: Final = 2.0
# With --simulate, a simulated hand follows each routine from this long after it starts.
SIMULATED_HAND_LEAD_IN_S: Final = 1.0
MAX_PORT: Final = 65535


# --------------------------------------------------------------------------- helpers


def parse_broker(text: str, option: str = "--broker") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, 1883
    try:
        number = int(port)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not HOST:PORT", param_hint=option) from None
    if not 0 < number <= MAX_PORT:
        raise click.BadParameter(f"port {number} is out of range", param_hint=option)
    return host, number


def mqtt_settings(
    config: MqttSettings | None,
    broker: str | None,
    *,
    username: str | None = None,
    password: str | None = None,
    tls_ca_file: Path | None = None,
) -> MqttSettings | None:
    """The broker to use: ``--broker`` (and credentials) over the ``[mqtt]`` table."""
    from dataclasses import replace

    if broker is None and config is None:
        return None
    base = config or MqttSettings(host="localhost")
    host, port = parse_broker(broker) if broker else (base.host, base.port)
    return replace(
        base,
        host=host,
        port=port,
        username=username if username is not None else base.username,
        password=password if password is not None else base.password,
        tls_ca_file=tls_ca_file or base.tls_ca_file,
    )


def default_bridge_id() -> str:
    """``bridge-<hostname>``, with only characters a topic level may carry."""
    import socket

    host = socket.gethostname().split(".")[0] or "local"
    return "bridge-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in host)


def checked_bridge_id(bridge_id: str, option: str) -> str:
    """A bridge id that can be one MQTT topic level, or a usage error saying why not."""
    if not bridge_id or any(c in bridge_id for c in "/+#"):
        raise click.BadParameter(
            f"{bridge_id!r} cannot be a bridge id (non-empty, without '/', '+' or '#')",
            param_hint=option,
        )
    return bridge_id


def load_policy(settings: Settings) -> SafetyPolicy:
    from devicebridge.core.policy import default_policy, parse_policy

    if settings.policy_file is None:
        return default_policy()
    try:
        text = settings.policy_file.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=settings.policy_file) from exc
    try:
        return parse_policy(text, label=str(settings.policy_file))
    except ValueError as exc:
        raise ConfigError(str(exc), path=settings.policy_file) from exc


def open_programs(cli: CliContext) -> ProgramStore:
    from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore

    return ProgramStore(writable_data_dir(cli) / PROGRAMS_FILENAME)


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


@click.command("serve")
@click.option("--bridge-id", default=None, help="This bridge's id in MQTT topics (config).")
@click.option("--broker", default=None, help="MQTT broker HOST:PORT (overrides [mqtt]).")
@click.option("--log-json", is_flag=True, default=None, help="Log JSON lines (config log_json).")
@click.option(
    "--run",
    "run_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Run this routine (a file or a starter id) once on --device when it connects.",
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
    """Keep the paired devices connected, record sessions, and publish them over MQTT.

    Publishing needs a broker (--broker HOST:PORT or an [mqtt] table); without one the
    bridge works locally. The bridge id names it in topics (--bridge-id, bridge_id in the
    config, or bridge-<hostname>). On a terminal a full-screen view shows devices,
    sessions, the outbox and the broker; elsewhere one JSON line per status change.
    """
    import asyncio
    import logging
    import signal

    from devicebridge.app import App, freeze_start_up
    from devicebridge.cli.routines import resolve_routine
    from devicebridge.cli.views import ServeView
    from devicebridge.service.logs import configure_logging
    from devicebridge.service.supervisor import BridgeService
    from devicebridge.storage import lock as bridge_lock

    settings = cli.settings
    level = logging.getLogger().getEffectiveLevel()
    configure_logging(
        min(level, logging.INFO),
        json_lines=settings.log_json if log_json is None else log_json,
    )
    policy = load_policy(settings)
    routine = resolve_routine(str(run_file), policy) if run_file is not None else None
    mqtt = mqtt_settings(settings.mqtt, broker)
    bid = checked_bridge_id(bridge_id or settings.bridge_id or default_bridge_id(), "--bridge-id")
    data_dir = writable_data_dir(cli)

    async def go() -> None:
        async with App(cli.options) as app:
            devices = await _devices_to_serve(app)

            def guide_hand(serial: str, started: Any) -> None:
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
            freeze_start_up()
            if routine is not None:
                target = _pick_device(devices, routine.device_kind.value, device)
                await service.start_routine(target.serial_number, routine)
            view = asyncio.create_task(
                ServeView(cli.console, lambda: service.status("running")).run()
            )
            try:
                await task
            finally:
                view.cancel()
                await asyncio.gather(view, return_exceptions=True)

    # One bridge per data directory, refused before anything starts (held until exit).
    with bridge_lock.acquire(data_dir):
        run(go())
    click.echo(f"bridge {bid} stopped", err=True)


async def _devices_to_serve(app: App) -> list[PairedDevice]:
    from devicebridge.device.transport.ble import kind_label
    from devicebridge.storage.registry import PairedDevice

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
    served = ", ".join(f"{p.name} ({kind_words(p.kind)})" for p in devices) or "none"
    raise ServiceError(
        f"no {'device ' + wanted if wanted else kind_words(kind)} among the served devices "
        f"({served})"
    )


# --------------------------------------------------------------------------- status


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status file as JSON.")
@pass_cli
@reports_errors
def status_command(cli: CliContext, as_json: bool) -> None:
    """Whether `devicebridge serve` runs here, its devices and its broker link."""
    from devicebridge.service.status import read_status_file

    data_dir = cli.data_dir
    status = read_status_file(data_dir)
    if status is None:
        raise ServiceError(
            f"the bridge has never run with data directory {data_dir}; start it with: "
            "devicebridge serve"
        )
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
        click.echo(f"bridge: {state}; starting, no status written yet")
        return
    mqtt = status["mqtt"]
    link = (
        f"{mqtt['host']}:{mqtt['port']} {'connected' if mqtt['connected'] else 'disconnected'}"
        if mqtt["configured"]
        else "no broker configured"
    )
    click.echo(f"bridge {status['bridge_id']}: {state}, updated {status['updated_at']}")
    click.echo(f"MQTT: {link}; outbox: {status['outbox_depth']} waiting")
    if not status["devices"]:
        click.echo("No devices.")
        return
    table = Table(("name", "kind", "serial", "state", "battery", "session"), title="Devices")
    for d in status["devices"]:
        battery = d["battery_percent"]
        table.add_row(
            d["name"],
            kind_words(d["kind"]),
            d["serial"],
            d["state"],
            "-" if battery is None else f"{battery}%",
            fmt(d["session_id"]),
        )
    table.echo()


# --------------------------------------------------------------------------- therapist


@click.group("therapist")
def therapist_group() -> None:
    """For therapists: signing keys and adherence of their clients' bridges."""


@therapist_group.command("keygen")
@click.option("--id", "therapist_id", default=DEFAULT_THERAPIST_ID, show_default=True)
@reports_errors
def keygen_command(therapist_id: str) -> None:
    """Create an Ed25519 signing key; print the public key to give to clients.

    The key is kept in the user config directory (keys/, or DEVICEBRIDGE_KEY_DIR),
    whatever the data directory.
    """
    import base64
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from devicebridge.core.signed_program import key_id, public_key_bytes
    from devicebridge.errors import TherapistKeyError
    from devicebridge.storage.files import PRIVATE_FILE_MODE
    from devicebridge.storage.keys import key_path, private_key_dir

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
@click.option("--timeout-s", type=POSITIVE_S, default=DEFAULT_READ_TIMEOUT_S, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
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
    from devicebridge.integrations.mqtt import Topics, read_retained

    del cli
    settings = mqtt_settings(
        None, broker, username=username, password=password, tls_ca_file=tls_ca_file
    )
    assert settings is not None
    topics = Topics(checked_bridge_id(bridge_id, "BRIDGE_ID"))
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
        echo_json({**adherence, "availability": availability})
        return
    click.echo(f"bridge {bridge_id}: {availability}")
    programs = Table(
        ("id", "routine", "version", "therapist", "installed on", "pending", "expires"),
        title="Programs",
    )
    for p in adherence["programs"]:
        programs.add_row(
            str(p["program_id"]),
            p["routine"],
            p["program_version"],
            p["therapist_id"],
            ", ".join(p["installed_on"]) or "-",
            ", ".join(p["pending_on"]) or "-",
            p["expires_at"][:16].replace("T", " "),
        )
    programs.echo()
    if not adherence["sessions"]:
        click.echo("No sessions with these programs yet.")
        return
    sessions = Table(
        ("session", "program", "device", "started", "status", "done", "in band", "dose J/cm²"),
        title="Sessions run with these programs",
    )
    for s in adherence["sessions"]:
        summary = s["summary"]
        dose = summary.get("dose_j_cm2")
        sessions.add_row(
            str(s["session_id"]),
            fmt(s["program_id"]),
            s["serial"],
            s["started_at"][:16].replace("T", " "),
            s["status"],
            _percent(summary.get("completion")),
            _percent(summary.get("in_band_fraction")),
            ", ".join(f"{k} {v:.1f}" for k, v in dose.items() if v) if dose else "-",
        )
    sessions.echo()


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


# --------------------------------------------------------------------------- trust


@click.group("trust")
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
    import base64

    from devicebridge.core.signed_program import key_id, load_public_key, public_key_bytes

    try:
        key = load_public_key(public_key)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="PUBLIC_KEY") from None
    if not therapist_id.strip():
        raise click.BadParameter("give the therapist's id", param_hint="--therapist")
    store = open_programs(cli)
    try:
        kid = key_id(key)
        store.trust(kid, therapist_id, base64.b64encode(public_key_bytes(key)).decode())
    finally:
        store.close()
    click.echo(f"trusted key {kid} of {therapist_id}")


@trust_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@reports_errors
def trust_list_command(cli: CliContext, as_json: bool) -> None:
    """The trusted therapist keys."""
    store = open_programs(cli)
    try:
        keys = store.trusted_keys()
    finally:
        store.close()
    if as_json:
        echo_json(
            [
                {
                    "key_id": k.key_id,
                    "therapist_id": k.therapist_id,
                    "public_key": k.public_key,
                    "added_at": k.added_at.isoformat(),
                }
                for k in keys
            ]
        )
        return
    if not keys:
        click.echo("No trusted keys (devicebridge trust add PUBLIC_KEY --therapist ID).")
        return
    table = Table(("key id", "therapist", "added", "public key"), title="Trusted therapist keys")
    for k in keys:
        table.add_row(
            k.key_id, k.therapist_id, k.added_at.isoformat()[:16].replace("T", " "), k.public_key
        )
    table.echo()


@trust_group.command("remove")
@click.argument("key_id_", metavar="KEY_ID")
@pass_cli
@reports_errors
def trust_remove_command(cli: CliContext, key_id_: str) -> None:
    """Stop trusting KEY_ID."""
    store = open_programs(cli)
    try:
        removed = store.distrust(key_id_)
        known = [k.key_id for k in store.trusted_keys()]
    finally:
        store.close()
    if not removed:
        from devicebridge.cli.base import choices_text

        raise ServiceError(f"no trusted key {key_id_} ({choices_text(known, key_id_)})")
    click.echo(f"removed key {key_id_}")


# --------------------------------------------------------------------------- routine sign/push


def sign_file(
    spec: str,
    *,
    client: str,
    therapist_id: str | None,
    valid_days: float,
    version: str | None,
    max_validity: timedelta,
) -> bytes:
    """Check a routine (a file or a starter id) against the shipped policy, then sign it
    for ``client``."""
    from devicebridge.cli.routines import routine_source
    from devicebridge.core.policy import default_policy
    from devicebridge.core.routine import RoutineError, parse_routine
    from devicebridge.core.signed_program import (
        ProgramRejectedError,
        check_validity_period,
        sign_program,
    )
    from devicebridge.storage.keys import load_private_key

    checked_bridge_id(client, "--client")
    try:
        # Bridges refuse programs valid for longer than their maximum (the same rule).
        check_validity_period(timedelta(days=valid_days), max_validity)
    except ProgramRejectedError as exc:
        raise click.BadParameter(exc.message, param_hint="--valid-days") from None
    text, label = routine_source(spec)
    try:
        routine = parse_routine(text, default_policy(), label=label)
    except RoutineError as exc:
        raise CliInputError(f"{label} is not a valid routine:\n{exc}") from None
    therapist, key = load_private_key(therapist_id)
    signed = sign_program(
        key,
        text.encode("utf-8"),
        therapist_id=therapist,
        client_id=client,
        program_version=version or routine.version or "1",
        issued_at=datetime.now(UTC),
        valid_for=timedelta(days=valid_days),
    )
    return signed.to_json()


@click.command("sign")
@click.argument("routine_spec", metavar="ROUTINE")
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
    routine_spec: str,
    client: str,
    therapist_id: str | None,
    valid_days: float,
    version: str | None,
    output: Path,
) -> None:
    """Sign ROUTINE (a file or a starter id) for one client's bridge; write it to OUTPUT."""
    envelope = sign_file(
        routine_spec,
        client=client,
        therapist_id=therapist_id,
        valid_days=valid_days,
        version=version,
        max_validity=cli.settings.programs.max_validity,
    )
    output.write_bytes(envelope)
    meta = json.loads(envelope)["metadata"]
    click.echo(f"signed {routine_spec} for {client}: {output} (expires {meta['expires_at']})")


async def push_envelope(
    settings: MqttSettings, bridge_id: str, envelope: bytes, *, timeout_s: float
) -> dict[str, Any] | None:
    """Publish a signed envelope to the bridge and wait for its acknowledgement (by nonce).

    An envelope whose nonce the bridge could not read (not JSON, too large, no nonce) is
    refused here with :class:`ProgramRejectedError`: the bridge would drop it unanswered.
    """
    from devicebridge.core.signed_program import ProgramRejectedError, parse_envelope
    from devicebridge.integrations.mqtt import Topics, request_reply

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


@click.command("push")
@click.argument("routine_spec", metavar="FILE")
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
@click.option("--timeout-s", type=POSITIVE_S, default=DEFAULT_ACK_TIMEOUT_S, show_default=True)
@pass_cli
@reports_errors
def push_command(
    cli: CliContext,
    routine_spec: str,
    client: str,
    broker: str,
    username: str | None,
    password: str | None,
    tls_ca_file: Path | None,
    therapist_id: str | None,
    valid_days: float,
    timeout_s: float,
) -> None:
    """Push FILE (a signed envelope, or a routine or starter id to sign now) to a client's
    bridge, and wait for its answer."""
    checked_bridge_id(client, "--client")
    path = Path(routine_spec)
    data = path.read_bytes() if path.is_file() else b""
    if not _is_envelope(data):
        data = sign_file(
            routine_spec,
            client=client,
            therapist_id=therapist_id,
            valid_days=valid_days,
            version=None,
            max_validity=cli.settings.programs.max_validity,
        )
    settings = mqtt_settings(
        None, broker, username=username, password=password, tls_ca_file=tls_ca_file
    )
    assert settings is not None
    ack = run(push_envelope(settings, client, data, timeout_s=timeout_s))
    if ack is None:
        click.echo(
            f"no answer from bridge {client} within {timeout_s:g} s: if it is offline, the"
            " broker keeps the push until it reconnects (see `devicebridge therapist status`)",
            err=True,
        )
        raise click.exceptions.Exit(1)
    if ack["status"] == "accepted":
        click.echo(
            f"accepted: program {ack['program_id']} ({ack['routine']} v{ack['program_version']})"
            f" on bridge {client}"
        )
        return
    click.echo(f"rejected: {ack['reason']}: {ack['detail']}", err=True)
    raise click.exceptions.Exit(1)


def _is_envelope(data: bytes) -> bool:
    from devicebridge.core.signed_program import FORMAT

    try:
        return bool(json.loads(data).get("format") == FORMAT)
    except (ValueError, AttributeError):
        return False
