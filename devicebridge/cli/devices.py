"""Device commands: scan, pair, devices, forget, watch, and the demo."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table

from devicebridge.app import App, run_demo
from devicebridge.cli.base import CliContext, fmt, main, pass_cli, reports_errors, run
from devicebridge.cli.routines import GuidanceView, state_panel
from devicebridge.cli.routines import summary_table as routine_summary_table
from devicebridge.config import Settings
from devicebridge.core.catalogue import OFCP_FAMILY
from devicebridge.device.monitor import DeviceSnapshot, TelemetryMonitor
from devicebridge.device.transport.ble import kind_label
from devicebridge.errors import DeviceNotFoundError
from devicebridge.run.view import RunnerState
from devicebridge.storage.registry import PairedDevice

WATCH_REFRESH_S: Final = 0.5
PLAIN_PRINT_INTERVAL_S: Final = 1.0
DEFAULT_PAIR_TIMEOUT_S: Final = 10.0


# --------------------------------------------------------------------------- scan


@main.command("scan")
@click.option("--timeout-s", type=float, default=None, help="How long to listen (seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@reports_errors
def scan_command(cli: CliContext, timeout_s: float | None, as_json: bool) -> None:
    """List nearby facial-care devices of every catalogued family, with what each supports."""

    async def go() -> list[dict[str, Any]]:
        async with App(cli.options) as app:
            found = await app.scan(timeout_s or cli.options.settings.scan_timeout_s)
            with app.open_registry() as registry:
                rows = []
                for device in found:
                    paired = registry.find_by_serial(device.identity)
                    support = device.support
                    rows.append(
                        {
                            "name": device.name,
                            "family": device.family,
                            "kind": device.kind_label,
                            "model": paired.model if paired else device.model,
                            "supports": support.describe() if support else None,
                            # Advertising carries no firmware version; a paired device
                            # shows the one recorded at pairing.
                            "firmware": registry.current_firmware(paired.serial_number)
                            if paired
                            else None,
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

    rows = run(go())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Devices in range")
    columns = ("name", "family", "kind", "model", "supports", "firmware", "serial", "battery")
    for column in (*columns, "RSSI", "paired"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            row["family"],
            row["kind"],
            fmt(row["model"]),
            fmt(row["supports"]),
            fmt(row["firmware"]),
            fmt(row["serial_number"] or row["identity"]),
            fmt(row["battery_percent"], "d") + ("%" if row["battery_percent"] is not None else ""),
            f"{row['rssi_dbm']} dBm",
            f"yes ({row['paired_name']})" if row["paired"] else "no",
        )
    cli.console.print(table if rows else "No devices found.")


# --------------------------------------------------------------------------- pair


@main.command("pair")
@click.argument("device", required=False)
@click.option("--name", default=None, help="Name to use for the device (default: its own).")
@click.option(
    "--serial-port",
    default=None,
    help="Pair the device on this serial port instead of over Bluetooth.",
)
@click.option("--timeout-s", type=float, default=DEFAULT_PAIR_TIMEOUT_S, show_default=True)
@pass_cli
@reports_errors
def pair_command(
    cli: CliContext, device: str | None, name: str | None, serial_port: str | None, timeout_s: float
) -> None:
    """Pair DEVICE (serial number, address or advertised name) and remember it."""
    if device is None and serial_port is None:
        raise click.UsageError("give a DEVICE (serial number, address or name) or --serial-port")

    async def go() -> tuple[PairedDevice, str, bool]:
        async with App(cli.options) as app:
            if serial_port is not None:
                transport = app.serial_transport(serial_port)
                info = await app.read_info(transport)
                if device is not None and device != info.serial_number:
                    raise DeviceNotFoundError(
                        device, where=f"{serial_port} has serial {info.serial_number}"
                    )
                default_name, address = info.serial_number, None
                family = OFCP_FAMILY
            else:
                assert device is not None
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
                new_version = registry.record_firmware(info.serial_number, info.firmware_revision)
            return stored, info.firmware_revision, new_version

    stored, firmware, _ = run(go())
    # A family without serial numbers is known by its identity rule (docs/devices.md).
    known_as = (
        f"serial {stored.serial_number}"
        if stored.family == OFCP_FAMILY
        else f"{stored.family} device known as {stored.serial_number}"
    )
    cli.console.print(
        f"Paired {stored.name!r}: {stored.kind} {stored.model}, {known_as}, "
        f"firmware {firmware or 'not reported'}, over {stored.transport}",
        highlight=False,
    )


# --------------------------------------------------------------------------- devices / forget


@main.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@reports_errors
def devices_command(cli: CliContext, as_json: bool) -> None:
    """List paired devices."""
    app = App(cli.options)
    with app.open_registry() as registry:
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
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        cli.console.print("No paired devices. Use 'devicebridge pair DEVICE'.")
        return
    table = Table(title=f"Paired devices ({app.data_dir})")
    for column in ("name", "family", "kind", "model", "serial", "firmware", "link", "paired at"):
        table.add_column(column)
    for row in rows:
        link = f"serial {row['serial_port']}" if row["transport"] == "serial" else "ble"
        if row["transport"] == "ble" and row["address"]:
            link += f" {row['address']}"
        table.add_row(
            row["name"],
            row["family"],
            row["kind"],
            row["model"],
            row["serial_number"],
            fmt(row["firmware"]),
            link,
            fmt(row["paired_at"]),
        )
    cli.console.print(table)


@main.command("forget")
@click.argument("name")
@pass_cli
@reports_errors
def forget_command(cli: CliContext, name: str) -> None:
    """Forget the paired device NAME."""
    with App(cli.options).open_registry() as registry:
        removed = registry.remove(name)
    cli.console.print(f"Forgot {removed.name!r} (serial {removed.serial_number}).", highlight=False)


# --------------------------------------------------------------------------- live tables

LIVE_COLUMNS: Final = (
    "device",
    "state",
    "pressure kPa",
    "contact",
    "zone",
    "battery %",
    "skin °C",
    "LED mW/cm² (R/NIR/B)",
    "samples",
    "gaps",
)


def _led(snapshot: DeviceSnapshot) -> str:
    if snapshot.red_mw_cm2 is None:
        return "-"
    return (
        f"{snapshot.red_mw_cm2:.1f}/{fmt(snapshot.near_infrared_mw_cm2, '.1f')}"
        f"/{fmt(snapshot.blue_mw_cm2, '.1f')}"
    )


def live_table(snapshots: Sequence[DeviceSnapshot], title: str) -> Table:
    table = Table(title=title)
    for column in LIVE_COLUMNS:
        table.add_column(column)
    for s in snapshots:
        table.add_row(
            s.name,
            s.state,
            fmt(s.pressure_kpa, ".2f"),
            fmt(s.contact),
            fmt(s.zone),
            fmt(s.battery_percent),
            fmt(s.skin_temperature_c, ".1f"),
            _led(s),
            str(s.samples),
            f"{s.gaps} ({s.lost_samples} lost)" if s.lost_samples else str(s.gaps),
        )
    return table


def plain_line(s: DeviceSnapshot) -> str:
    parts = [
        f"{s.name}: state={s.state}",
        f"samples={s.samples}",
        f"gaps={s.gaps}",
        f"battery={fmt(s.battery_percent)}%",
        f"skin={fmt(s.skin_temperature_c, '.1f')}C",
    ]
    if s.pressure_kpa is not None:
        parts += [
            f"pressure={s.pressure_kpa:.2f}kPa",
            f"contact={fmt(s.contact)}",
            f"zone={s.zone}",
        ]
    if s.red_mw_cm2 is not None:
        parts.append(f"led={_led(s)}mW/cm2")
    return " ".join(parts)


def summary_table(snapshots: Sequence[DeviceSnapshot]) -> Table:
    table = Table(title="Summary")
    for column in (
        "device",
        "kind",
        "samples",
        "gaps",
        "lost",
        "backfilled",
        "reconnects",
        "malformed",
        "mean pressure kPa",
        "max skin °C",
    ):
        table.add_column(column)
    for s in snapshots:
        table.add_row(
            s.name,
            s.kind,
            str(s.samples),
            str(s.gaps),
            str(s.lost_samples),
            str(s.backfilled_samples),
            str(s.reconnects),
            str(s.malformed),
            fmt(s.mean_pressure_kpa, ".2f"),
            fmt(s.max_skin_temperature_c, ".1f"),
        )
    return table


class LiveView:
    """A rich Live table on a terminal; a plain line per device per second elsewhere."""

    def __init__(self, console: Console, title: str, now_s: Callable[[], float]) -> None:
        self.console = console
        self.title = title
        self._now_s = now_s
        self._live: Live | None = None
        self._last_plain_s: float | None = None

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(live_table([], self.title), console=self.console)
            self._live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(
        self, snapshots: Sequence[DeviceSnapshot], extra: Sequence[RenderableType] = ()
    ) -> None:
        if self._live is not None:
            table = live_table(snapshots, self.title)
            self._live.update(Group(table, *extra) if extra else table)
            return
        now_s = self._now_s()
        if self._last_plain_s is None or now_s - self._last_plain_s >= PLAIN_PRINT_INTERVAL_S:
            self._last_plain_s = now_s
            for snapshot in snapshots:
                self.console.print(f"[t={now_s:7.2f}s] {plain_line(snapshot)}", highlight=False)


# --------------------------------------------------------------------------- watch


@main.command("watch")
@click.argument("name")
@click.option("--duration-s", type=float, default=None, help="Stop after this long (seconds).")
@click.option("--serial-port", default=None, help="Use this serial port for the device.")
@pass_cli
@reports_errors
def watch_command(
    cli: CliContext, name: str, duration_s: float | None, serial_port: str | None
) -> None:
    """Show live telemetry of the paired device NAME until Ctrl-C."""

    async def go() -> DeviceSnapshot:
        async with App(cli.options) as app:
            with app.open_registry() as registry:
                paired = registry.get(name)
            transport = app.transport_for(paired, serial_port)
            session = app.session(transport, paired.kind, name=paired.name)
            monitor = TelemetryMonitor(session, paired.name, paired.kind)
            monitor.start()
            try:
                await session.start()
                info = session.device_info
                with app.open_registry() as registry:
                    if registry.record_firmware(paired.serial_number, info.firmware_revision):
                        cli.error_console.print(
                            f"{paired.name}: firmware is now {info.firmware_revision}",
                            highlight=False,
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
        cli.console.print("Stopped.")
        return
    cli.console.print(summary_table([snapshot]))


# --------------------------------------------------------------------------- demo


@main.command("demo")
@click.option("--fast", is_flag=True, help="Run the simulated devices as fast as possible.")
@click.option("--duration-s", type=float, default=8.0, show_default=True)
@pass_cli
@reports_errors
def demo_command(cli: CliContext, fast: bool, duration_s: float) -> None:
    """Two simulated massagers and an LED mask, found and streamed over the real bleak API."""
    settings: Settings = cli.options.settings
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
                seed=cli.options.sim_seed,
                duration_s=duration_s,
                fast=fast or cli.options.sim_fast,
                massagers=max(1, settings.sim_massagers),
                masks=max(1, settings.sim_masks),
                on_update=on_update,
                on_routine_state=on_routine_state,
                on_routine_decision=guidance.on_decision,
            )
        )
    cli.console.print(summary_table(result.snapshots))
    for routine in result.routines:
        cli.console.print(routine_summary_table(routine))
    if not result.sequences_ok:
        cli.error_console.print("warning: telemetry arrived out of order")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
