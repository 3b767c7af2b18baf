"""Device commands: scan, pair, devices, forget, watch, and the demo.

``devices`` and ``forget`` need only the registry; the others import the app (bleak, the
simulator, rich's live views) inside their functions, when they run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import click

from devicebridge.cli.base import (
    EXIT_INTERRUPTED,
    POSITIVE_S,
    CliContext,
    choices_text,
    echo_json,
    fmt,
    pass_cli,
    reports_errors,
    run,
    writable_data_dir,
)
from devicebridge.cli.table import Table
from devicebridge.cli.words import kind_words
from devicebridge.errors import CliInputError, UnknownDeviceError

if TYPE_CHECKING:
    from devicebridge.app import App
    from devicebridge.device.monitor import DeviceSnapshot
    from devicebridge.device.transport.ble import DiscoveredDevice
    from devicebridge.storage.registry import DeviceRegistry, PairedDevice

WATCH_REFRESH_S: Final = 0.5
DEFAULT_PAIR_TIMEOUT_S: Final = 10.0


def open_registry(cli: CliContext) -> DeviceRegistry:
    """The registry of the data directory (checked writable first: one clear error)."""
    from devicebridge.storage.registry import DeviceRegistry

    return DeviceRegistry.in_data_dir(writable_data_dir(cli))


def paired_device(registry: DeviceRegistry, name: str) -> PairedDevice:
    """The paired device called ``name`` (or with that serial number); a miss names the
    paired devices and the closest one."""
    try:
        return registry.get(name)
    except UnknownDeviceError:
        by_serial = registry.find_by_serial(name)
        if by_serial is not None:
            return by_serial
        names = [d.name for d in registry.list_devices()]
        raise CliInputError(
            f"no paired device named {name!r} "
            f"({choices_text(names, name, label='paired', none='none yet')}); "
            "pair one with: devicebridge pair SERIAL"
        ) from None


# --------------------------------------------------------------------------- scan


def scan_rows(found: Sequence[DiscoveredDevice], registry: DeviceRegistry) -> list[dict[str, Any]]:
    """One row per device in range, as ``scan --json`` prints it (the table shows the same)."""
    rows = []
    for device in found:
        # A family without serial numbers is paired under its identity (docs/devices.md).
        paired = registry.find_by_serial(device.identity)
        support = device.support
        rows.append(
            {
                "name": device.name,
                "family": device.family,
                "kind": device.kind_label,
                "model": paired.model if paired else device.model,
                "supports": support.describe() if support else None,
                # Advertising carries no firmware version; a paired device shows the one
                # recorded at pairing.
                "firmware": registry.current_firmware(paired.serial_number) if paired else None,
                "serial_number": device.serial_number,
                "identity": device.identity,
                "battery_percent": device.battery_percent,
                "rssi_dbm": device.rssi,
                "address": device.address,
                "paired": paired is not None,
                "paired_name": paired.name if paired else None,
            }
        )
    return rows


def scan_table(rows: Sequence[dict[str, Any]], title: str = "Devices in range") -> Table:
    table = Table(
        ("name", "family", "kind", "serial", "battery", "signal", "paired as", "supports"),
        title=title,
    )
    for row in rows:
        battery = row["battery_percent"]
        table.add_row(
            row["name"],
            row["family"],
            kind_words(row["kind"]),
            fmt(row["serial_number"] or row["identity"]),
            "-" if battery is None else f"{battery}%",
            f"{row['rssi_dbm']} dBm",
            row["paired_name"] if row["paired"] else "-",
            fmt(row["supports"]),
        )
    return table


async def scan_with_spinner(app: App, timeout_s: float) -> list[DiscoveredDevice]:
    from devicebridge.cli.views import spinner

    async with spinner("Scanning for devices", app.clock.now_s, timeout_s):
        return await app.scan(timeout_s)


@click.command("scan")
@click.option("--timeout-s", type=POSITIVE_S, default=None, help="How long to listen (seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@reports_errors
def scan_command(cli: CliContext, timeout_s: float | None, as_json: bool) -> None:
    """List nearby facial-care devices."""
    from devicebridge.app import App

    writable_data_dir(cli)

    async def go() -> list[dict[str, Any]]:
        async with App(cli.options) as app:
            found = await scan_with_spinner(app, timeout_s or cli.settings.scan_timeout_s)
            with app.open_registry() as registry:
                return scan_rows(found, registry)

    rows = run(go())
    if as_json:
        echo_json(rows)
    elif rows:
        scan_table(rows).echo()
    else:
        click.echo("No devices found (is the device on and close by?).")


# --------------------------------------------------------------------------- pair


@click.command("pair")
@click.argument("device", required=False)
@click.option("--name", default=None, help="Name to use for the device (default: its own).")
@click.option(
    "--serial-port",
    default=None,
    help="Pair the device on this serial port instead of over Bluetooth.",
)
@click.option("--timeout-s", type=POSITIVE_S, default=DEFAULT_PAIR_TIMEOUT_S, show_default=True)
@pass_cli
@reports_errors
def pair_command(
    cli: CliContext, device: str | None, name: str | None, serial_port: str | None, timeout_s: float
) -> None:
    """Pair DEVICE (serial number, address or advertised name) and remember it.

    Without DEVICE, lists the devices in range to choose from.
    """
    from devicebridge.app import App
    from devicebridge.cli.views import spinner
    from devicebridge.core.catalogue import OFCP_FAMILY
    from devicebridge.device.transport.ble import kind_label
    from devicebridge.errors import DeviceNotFoundError
    from devicebridge.storage.registry import PairedDevice

    writable_data_dir(cli)
    if name is not None and not name.strip():
        raise CliInputError("--name: give a name with at least one visible character")

    async def in_range(app: App) -> None:
        found = await scan_with_spinner(app, cli.settings.scan_timeout_s)
        with app.open_registry() as registry:
            rows = [r for r in scan_rows(found, registry) if not r["paired"]]
        if rows:
            scan_table(rows, "Devices in range, not paired yet").echo()
            raise CliInputError(
                "which one? give its serial number: devicebridge pair SERIAL [--name NAME]"
            )
        raise CliInputError(
            "no unpaired device in range: switch it on and bring it close, or pair one on a "
            "serial port with --serial-port PATH"
        )

    async def go() -> tuple[PairedDevice, str]:
        async with App(cli.options) as app:
            if serial_port is None and device is None:
                await in_range(app)
            if serial_port is not None:
                transport = app.serial_transport(serial_port)
                info = await app.read_info(transport)
                if device is not None and device != info.serial_number:
                    raise DeviceNotFoundError(
                        device, where=f"{serial_port} has serial {info.serial_number}"
                    )
                default_name, address, family = info.serial_number, None, OFCP_FAMILY
            else:
                assert device is not None
                async with spinner(f"Looking for {device}", app.clock.now_s, timeout_s):
                    found = await app.find(device, timeout_s)
                    info = await app.read_info(app.ble_transport(found))
                default_name, address, family = found.name, found.address, found.family
            paired = PairedDevice(
                name=name or default_name,
                serial_number=info.serial_number,
                kind=kind_label(info.kind),
                model=info.model_number,
                transport="serial" if serial_port else "ble",
                last_address=address,
                serial_port=serial_port,
                family=family,
            )
            with app.open_registry() as registry:
                stored = registry.add(paired)
                registry.record_firmware(info.serial_number, info.firmware_revision)
            return stored, info.firmware_revision

    stored, firmware = run(go())
    # A family without serial numbers is known by its identity rule (docs/devices.md).
    known_as = (
        f"serial {stored.serial_number}"
        if stored.family == OFCP_FAMILY
        else f"{stored.family} device known as {stored.serial_number}"
    )
    click.echo(
        f"Paired {stored.name!r}: {kind_words(stored.kind)} {stored.model}, {known_as}, "
        f"firmware {firmware or 'not reported'}, over {stored.transport}"
    )


# --------------------------------------------------------------------------- devices / forget


@click.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with firmware history).")
@pass_cli
@reports_errors
def devices_command(cli: CliContext, as_json: bool) -> None:
    """List paired devices."""
    with open_registry(cli) as registry:
        rows: list[dict[str, Any]] = [
            {
                "name": d.name,
                "serial_number": d.serial_number,
                "family": d.family,
                "kind": d.kind,
                "model": d.model,
                "transport": d.transport,
                "address": d.last_address,
                "serial_port": d.serial_port,
                "firmware": registry.current_firmware(d.serial_number),
                "firmware_history": [
                    {"version": r.version, "first_seen_at": r.first_seen_at.isoformat()}
                    for r in registry.firmware_history(d.serial_number)
                ],
                "paired_at": d.paired_at.isoformat() if d.paired_at else None,
            }
            for d in registry.list_devices()
        ]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No paired devices. Find one with 'devicebridge scan', then pair it.")
        return
    table = Table(
        ("name", "family", "kind", "model", "serial", "firmware", "link", "paired"),
        title=f"Paired devices ({cli.data_dir})",
    )
    for row in rows:
        link = f"serial {row['serial_port']}" if row["transport"] == "serial" else "BLE"
        earlier = [h["version"] for h in row["firmware_history"][:-1]]
        firmware = fmt(row["firmware"]) + (f" (was {', '.join(earlier)})" if earlier else "")
        table.add_row(
            row["name"],
            row["family"],
            kind_words(row["kind"]),
            row["model"],
            row["serial_number"],
            firmware,
            link,
            fmt(row["paired_at"])[:10],
        )
    table.echo()


@click.command("forget")
@click.argument("name")
@pass_cli
@reports_errors
def forget_command(cli: CliContext, name: str) -> None:
    """Forget the paired device NAME."""
    with open_registry(cli) as registry:
        removed = registry.remove(paired_device(registry, name).name)
    click.echo(f"Forgot {removed.name!r} (serial {removed.serial_number}).")


# --------------------------------------------------------------------------- watch


@click.command("watch")
@click.argument("name")
@click.option("--duration-s", type=POSITIVE_S, default=None, help="Stop after this long (seconds).")
@click.option("--serial-port", default=None, help="Use this serial port for the device.")
@pass_cli
@reports_errors
def watch_command(
    cli: CliContext, name: str, duration_s: float | None, serial_port: str | None
) -> None:
    """Show live telemetry of the paired device NAME until Ctrl-C."""
    from devicebridge.app import App
    from devicebridge.cli.views import LiveView, spinner
    from devicebridge.device.monitor import TelemetryMonitor

    with open_registry(cli) as registry:
        paired = paired_device(registry, name)
    monitor: TelemetryMonitor | None = None

    async def go() -> DeviceSnapshot:
        nonlocal monitor
        async with App(cli.options) as app:
            transport = app.transport_for(paired, serial_port)
            session = app.session(transport, paired.kind, name=paired.name)
            monitor = TelemetryMonitor(session, paired.name, paired.kind)
            monitor.start()
            try:
                async with spinner(
                    f"Connecting to {paired.name}", app.clock.now_s, cli.settings.scan_timeout_s
                ):
                    await session.start()
                info = session.device_info
                with app.open_registry() as registry:
                    if registry.record_firmware(paired.serial_number, info.firmware_revision):
                        click.echo(
                            f"{paired.name}: firmware is now {info.firmware_revision}", err=True
                        )
                    address = getattr(transport, "address", None)
                    if isinstance(address, str) and address != paired.last_address:
                        registry.update_address(paired.serial_number, address)
                clock = session.clock
                start_s = clock.now_s()
                with LiveView(cli.console, f"Watching {paired.name}", clock.now_s) as view:
                    while duration_s is None or clock.now_s() - start_s < duration_s:
                        step_s = WATCH_REFRESH_S
                        if duration_s is not None:
                            step_s = min(step_s, duration_s - (clock.now_s() - start_s))
                        await clock.sleep(step_s)
                        view.update([monitor.snapshot()])
            finally:
                await session.close()
                await monitor.stop()
            return monitor.snapshot()

    try:
        snapshot = run(go())
    except KeyboardInterrupt:
        click.echo("Stopped watching; the device was disconnected.", err=True)
        if monitor is not None:
            echo_snapshot_summary([monitor.snapshot()])
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    echo_snapshot_summary([snapshot])


def echo_snapshot_summary(snapshots: Sequence[DeviceSnapshot]) -> None:
    from devicebridge.cli.views import SNAPSHOT_COLUMNS, snapshot_rows

    table = Table(SNAPSHOT_COLUMNS, title="Summary")
    for row in snapshot_rows(snapshots):
        table.add_row(*row)
    table.echo()


# --------------------------------------------------------------------------- demo


@click.command("demo")
@click.option("--fast", is_flag=True, help="Run the simulated devices as fast as possible.")
@click.option("--duration-s", type=POSITIVE_S, default=8.0, show_default=True)
@pass_cli
@reports_errors
def demo_command(cli: CliContext, fast: bool, duration_s: float) -> None:
    """Two simulated massagers and an LED mask, live: found and streamed over the real
    bleak API, with a short routine on each kind."""
    from devicebridge.app import run_demo
    from devicebridge.cli.routines import echo_run_summary
    from devicebridge.cli.views import GuidanceView, LiveView, state_panel
    from devicebridge.run.view import RunnerState

    settings = cli.settings
    elapsed_s = [0.0]
    # Routine guidance: panels inside the live table on a terminal, plain lines elsewhere.
    guidance = GuidanceView(cli.console)
    states: dict[str, RunnerState] = {}

    def on_routine_state(state: RunnerState) -> None:
        states[state.device] = state
        if not cli.console.is_terminal:
            guidance.on_state(state)

    with LiveView(
        cli.console, "devicebridge demo (simulated devices)", lambda: elapsed_s[0]
    ) as view:

        def on_update(now_s: float, snapshots: Sequence[DeviceSnapshot]) -> None:
            elapsed_s[0] = now_s
            view.update(snapshots, [state_panel(s) for s in states.values()])

        result = run(
            run_demo(
                seed=cli.sim_seed,
                duration_s=duration_s,
                fast=fast or cli.sim_fast,
                massagers=max(1, settings.sim_massagers),
                masks=max(1, settings.sim_masks),
                on_update=on_update,
                on_routine_state=on_routine_state,
                on_routine_decision=guidance.on_decision,
            )
        )
    echo_snapshot_summary(result.snapshots)
    for routine in result.routines:
        echo_run_summary(routine)
    if not result.sequences_ok:
        click.echo("warning: telemetry arrived out of order", err=True)
