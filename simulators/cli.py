"""``devicebridge-sim``: run simulated devices on ptys, or list what a seed produces."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Final

import click

from simulators.clock import VirtualClock
from simulators.device import SimulatedDevice
from simulators.serial_port import PtySerialPort
from simulators.world import SimulatedWorld

KIND_LABELS: Final = {"MASSAGER": "massager", "LED_MASK": "mask"}


def _kind_label(device: SimulatedDevice) -> str:
    return KIND_LABELS.get(device.kind.name, device.kind.name.lower())


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
def list_devices(massagers: int, masks: int, seed: int) -> None:
    """Print the devices a seed produces: kind, serial number, name, address."""
    world = _build_world(massagers, masks, seed, VirtualClock())
    for device in world.devices:
        click.echo(f"{_kind_label(device)} {device.serial_number} {device.name} {device.address}")


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
def serve(
    massagers: int, masks: int, seed: int, use_serial: bool, fast: bool, speed: float
) -> None:
    """Run devices until Ctrl-C or SIGTERM; print one line per device: kind, serial, pty path."""
    if not use_serial:
        # The bleak backend lives in the host's process; out of process only
        # the serial transport reaches the devices.
        raise click.UsageError("nothing to serve without --serial (BLE simulation is in-process)")
    asyncio.run(_serve(massagers, masks, seed, fast=fast, speed=speed))


async def _serve(massagers: int, masks: int, seed: int, *, fast: bool, speed: float) -> None:
    clock = VirtualClock(realtime=not fast, speed=speed)
    world = _build_world(massagers, masks, seed, clock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ports: list[PtySerialPort] = []
    try:
        async with world:
            for device in world.devices:
                port = PtySerialPort(device)
                await port.start()
                ports.append(port)
                click.echo(f"{_kind_label(device)} {device.serial_number} {port.path}")
            # The host waits for these lines: flush, stdout may be a pipe.
            sys.stdout.flush()
            clock.start()
            await stop.wait()
            await clock.stop()
            for port in ports:
                await port.stop()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)
