"""``devicebridge-sim``: run simulated devices on ptys, or list what a seed produces."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import click

from simulators.clock import VirtualClock
from simulators.links.serial_port import PtySerialPort
from simulators.smp import SmpSerialPort, SmpUdpServer, build_image
from simulators.smp.image import DEFAULT_BODY_BYTES, ImageDefect
from simulators.world import SimulatedWorld


def _build_world(massagers: int, masks: int, seed: int, clock: VirtualClock) -> SimulatedWorld:
    world = SimulatedWorld(seed=seed, clock=clock)
    for _ in range(massagers):
        world.add_massager()
    for _ in range(masks):
        world.add_mask()
    return world


@click.group()
def main() -> None:
    """Simulated facial-care devices for devicebridge."""


_massagers_option = click.option(
    "--massagers", type=click.IntRange(min=0), default=1, show_default=True
)
_masks_option = click.option("--masks", type=click.IntRange(min=0), default=0, show_default=True)
_seed_option = click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="World seed."
)


@main.command(name="list")
@_massagers_option
@_masks_option
@_seed_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of lines.")
def list_devices(massagers: int, masks: int, seed: int, as_json: bool) -> None:
    """Print the devices a seed produces: kind, serial number, name, address."""
    world = _build_world(massagers, masks, seed, VirtualClock())
    if as_json:
        rows = [
            {
                "kind": device.kind_label,
                "serial_number": device.serial_number,
                "name": device.name,
                "address": device.address,
            }
            for device in world.devices
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    for device in world.devices:
        click.echo(f"{device.kind_label} {device.serial_number} {device.name} {device.address}")


@main.command()
@_massagers_option
@_masks_option
@_seed_option
@click.option("--serial", "use_serial", is_flag=True, help="Serve every device on its own pty.")
@click.option("--fast", is_flag=True, help="Run virtual time as fast as the CPU allows.")
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Realtime pace factor (ignored with --fast).",
)
@click.option(
    "--smp-serial", is_flag=True, help="Also serve each device's SMP console on a second pty."
)
@click.option(
    "--smp-udp-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve SMP over UDP on 127.0.0.1, device i on PORT + i (0: free ports).",
)
@click.option(
    "--smp-fail-boot", is_flag=True, help="New firmware images crash at boot (MCUboot reverts)."
)
def serve(
    massagers: int,
    masks: int,
    seed: int,
    use_serial: bool,
    fast: bool,
    speed: float,
    smp_serial: bool,
    smp_udp_port: int | None,
    smp_fail_boot: bool,
) -> None:
    """Run devices until Ctrl-C or SIGTERM; print one line per device: kind, serial, pty path.

    With SMP options the line goes on with ``smp-serial=PATH`` and ``smp-udp=HOST:PORT``.
    """
    if not use_serial and not smp_serial and smp_udp_port is None:
        # The bleak backend lives in the host's process; out of process only
        # the serial transport reaches the devices.
        raise click.UsageError("nothing to serve without --serial (BLE simulation is in-process)")
    smp = _SmpOptions(smp_serial, smp_udp_port, smp_fail_boot)
    asyncio.run(_serve(massagers, masks, seed, fast=fast, speed=speed, ofcp=use_serial, smp=smp))


@dataclass(frozen=True, slots=True)
class _SmpOptions:
    serial: bool = False
    udp_port: int | None = None
    fail_boot: bool = False


async def _serve(
    massagers: int,
    masks: int,
    seed: int,
    *,
    fast: bool,
    speed: float,
    ofcp: bool = True,
    smp: _SmpOptions | None = None,
) -> None:
    smp = smp or _SmpOptions()
    clock = VirtualClock(realtime=not fast, speed=speed)
    world = _build_world(massagers, masks, seed, clock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ports: list[PtySerialPort | SmpSerialPort | SmpUdpServer] = []
    try:
        async with world:
            for index, device in enumerate(world.devices):
                fields = [device.kind_label, device.serial_number]
                if ofcp:
                    port = PtySerialPort(device)
                    await port.start()
                    ports.append(port)
                    fields.append(port.path)
                else:
                    fields.append("-")
                firmware = world.smp_firmware(device)
                firmware.fails_new_image_boot = smp.fail_boot
                if smp.serial:
                    smp_port = SmpSerialPort(firmware)
                    await smp_port.start()
                    ports.append(smp_port)
                    fields.append(f"smp-serial={smp_port.path}")
                if smp.udp_port is not None:
                    udp = SmpUdpServer(firmware, port=smp.udp_port and smp.udp_port + index)
                    await udp.start()
                    ports.append(udp)
                    fields.append(f"smp-udp={udp.host}:{udp.port}")
                click.echo(" ".join(fields))
            # The host waits for these lines: flush, stdout may be a pipe.
            sys.stdout.flush()
            clock.start()
            await stop.wait()
            await clock.stop()
            for served in ports:
                await served.stop()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)


@main.command("build-image")
@click.option("--version", "version", required=True, help="MAJOR.MINOR.REVISION[+BUILD]")
@click.option("--model", required=True, help="Model number the image is for (e.g. OFC-FM1).")
@click.option(
    "--size",
    "body_bytes",
    type=click.IntRange(min=0),
    default=DEFAULT_BODY_BYTES,
    show_default=True,
    help="Bytes of (pseudo-random) firmware body.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--defect",
    type=click.Choice([d.value for d in ImageDefect]),
    default=None,
    help="Spoil the image on purpose (for refusal tests).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def build_image_command(
    version: str, model: str, body_bytes: int, seed: int, defect: str | None, output: Path
) -> None:
    """Write a small valid MCUboot image (version in the header, model in TLV 0x00A0)."""
    try:
        image = build_image(
            version,
            model,
            body_bytes=body_bytes,
            seed=seed,
            defect=ImageDefect(defect) if defect else None,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    output.write_bytes(image)
    click.echo(f"{output}: {len(image)} bytes, version {version}, model {model}")


# --------------------------------------------------------------------------- plugins

PLUGIN_GROUP: Final = "devicebridge_sim.commands"


def _add_plugin_commands() -> None:
    """Commands other installed packages add (entry-point group ``devicebridge_sim.commands``).

    This is how ``devicebridge-sim scenario`` arrives without the simulators importing the
    host: devicebridge registers it. A plugin that fails to load is reported, not fatal.
    """
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=PLUGIN_GROUP):
        if entry_point.name in main.commands:
            continue
        try:
            command = entry_point.load()
        except Exception as exc:  # any broken plugin must not break the CLI
            click.echo(f"devicebridge-sim: plugin {entry_point.name!r} not loaded: {exc}", err=True)
            continue
        if isinstance(command, click.Command):
            main.add_command(command, name=entry_point.name)


_add_plugin_commands()
