"""Firmware commands: ``firmware info`` and ``firmware update`` (MCUmgr/SMP).

``update`` checks the image (MCUboot format, hash, model) before it connects,
and its size against the device's update slot before it sends a byte, so a bad
image never costs the link anything. On a terminal the upload shows a rich
progress bar (bytes, rate, time left); elsewhere one plain line per tenth.
Ctrl-C ends it with one line saying how to resume.

The SMP stack (smpclient, pydantic) and rich are imported when a firmware command
runs, not when the command line starts.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from devicebridge.cli.base import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    PROGRAM_NAME,
    CliContext,
    echo_json,
    fmt,
    pass_cli,
    reports_errors,
    run,
)
from devicebridge.cli.table import Table

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from devicebridge.app import App
    from devicebridge.firmware import (
        FirmwareImage,
        FirmwareUpdater,
        Phase,
        SlotState,
        UpdateResult,
        UploadProgress,
    )
    from devicebridge.storage.registry import PairedDevice

PLAIN_PROGRESS_STEPS: Final = 10
HASH_SHOWN_CHARS: Final = 16

_smp_port_option = click.option(
    "--smp-port",
    default=None,
    help="The device's SMP console port (serial devices; not the OFCP port).",
)
_smp_udp_option = click.option(
    "--smp-udp", default=None, metavar="HOST[:PORT]", help="Reach the SMP server over UDP."
)


@click.group("firmware")
def firmware_group() -> None:
    """Device firmware over the standard MCUmgr/SMP protocol (BLE or serial)."""


def _updater_for(
    app: App, paired: PairedDevice, smp_port: str | None, smp_udp: str | None
) -> FirmwareUpdater:
    from devicebridge.firmware import connect

    return connect.updater_for(app, paired, smp_port=smp_port, smp_udp=smp_udp)


def _slot_rows(
    states: list[SlotState], slot_bytes: dict[tuple[int, int], int]
) -> list[dict[str, Any]]:
    return [
        {
            "image": s.image,
            "slot": s.slot,
            "version": s.version,
            "hash": s.hash_hex,
            "active": s.active,
            "pending": s.pending,
            "confirmed": s.confirmed,
            "permanent": s.permanent,
            "bootable": s.bootable,
            "size_bytes": slot_bytes.get((s.image, s.slot)),
        }
        for s in states
    ]


@firmware_group.command("info")
@click.argument("name")
@_smp_port_option
@_smp_udp_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@reports_errors
def info_command(
    cli: CliContext, name: str, smp_port: str | None, smp_udp: str | None, as_json: bool
) -> None:
    """The image slots of the paired device NAME: version, hash, active, pending, confirmed,
    and the size of each slot (when the device reports it)."""

    from devicebridge.app import App
    from devicebridge.cli.devices import open_registry, paired_device

    with open_registry(cli) as registry:
        paired = paired_device(registry, name)

    async def go() -> list[dict[str, Any]]:
        async with App(cli.options) as app:
            updater = _updater_for(app, paired, smp_port, smp_udp)
            try:
                states = await updater.read_states()
                images = await updater.read_slot_sizes() or []
            finally:
                await updater.close()
        sizes = {(i.image, s.slot): s.size for i in images for s in i.slots}
        return _slot_rows(states, sizes)

    rows = run(go())
    if as_json:
        echo_json(rows)
        return
    table = Table(
        ("image", "slot", "version", "hash", "active", "pending", "confirmed", "size"),
        title=f"Firmware slots of {paired.name}",
    )
    for row in rows:
        size = row["size_bytes"]
        table.add_row(
            str(row["image"]),
            str(row["slot"]),
            row["version"],
            row["hash"][:HASH_SHOWN_CHARS],
            fmt(row["active"]),
            fmt(row["pending"]) + (" (permanent)" if row["permanent"] else ""),
            fmt(row["confirmed"]),
            f"{size // 1024} KiB" if size is not None else "-",
        )
    table.echo()


class _ProgressView:
    """A rich progress bar on a terminal; plain lines (every tenth, and phases) elsewhere.

    It remembers the last phase and the last offset the device confirmed, for the
    line Ctrl-C prints."""

    def __init__(self, console: Console, image: FirmwareImage) -> None:
        self.console = console
        self.image = image
        self.last_phase: Phase | None = None
        self.confirmed_bytes = 0
        self._progress: Progress | None = None
        self._task: Any = None
        self._next_plain_step = 1
        self._started_s = time.monotonic()
        self._start_offset = 0

    def __enter__(self) -> _ProgressView:
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                f"upload {self.image.version_text}", total=self.image.size_bytes
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def phase(self, phase: Phase) -> None:
        from devicebridge.firmware import Phase

        self.last_phase = phase
        if phase is Phase.UPLOADING:
            self._started_s = time.monotonic()
        self._say(f"- {phase.value}" if self._progress is not None else f"{phase.value}...")

    def progress(self, update: UploadProgress) -> None:
        total = update.total_bytes
        self.confirmed_bytes = update.offset_bytes
        if update.resumed:
            self._start_offset = update.offset_bytes
            self._started_s = time.monotonic()
            # The tenths the device already had are not news.
            self._next_plain_step = update.offset_bytes * PLAIN_PROGRESS_STEPS // total + 1
            self._say(
                f"resuming at {update.offset_bytes} of {total} bytes "
                "(kept by the device from an earlier attempt)"
            )
        if self._progress is not None:
            self._progress.update(self._task, completed=update.offset_bytes)
            return
        while update.offset_bytes * PLAIN_PROGRESS_STEPS >= self._next_plain_step * total:
            elapsed_s = max(time.monotonic() - self._started_s, 1e-6)
            rate = (update.offset_bytes - self._start_offset) / elapsed_s
            left_s = (total - update.offset_bytes) / rate if rate > 0 else float("inf")
            self._say(
                f"uploaded {update.offset_bytes}/{total} bytes "
                f"({100 * update.offset_bytes // total}%), {rate / 1024:.1f} KiB/s, "
                f"{left_s:.1f} s left"
            )
            self._next_plain_step += 1

    def _say(self, text: str) -> None:
        console = self._progress.console if self._progress is not None else self.console
        console.print(text, highlight=False, markup=False)


def _interrupted_line(view: _ProgressView | None, device: str) -> str:
    """One line for Ctrl-C: where the update stood and the command that resumes it."""
    from devicebridge.firmware import Phase

    command = shlex.join([PROGRAM_NAME, *sys.argv[1:]])
    phase = view.last_phase if view is not None else None
    if phase is None or phase is Phase.CONNECTING:
        state = "before anything was sent; nothing changed on the device"
        action = "to update it"
    elif phase is Phase.UPLOADING:
        assert view is not None
        total = view.image.size_bytes
        state = (
            f"while uploading: {device} keeps the {view.confirmed_bytes:,} of {total:,} bytes "
            "it has"
        )
        action = "to resume from there"
    else:
        state = f"while {phase.value}: the image is on {device}"
        action = "to finish (it checks what runs and confirms the new image)"
    return f"interrupted {state}; {action}, run the same command again: {command}"


@firmware_group.command("update")
@click.argument("name")
@click.argument("image_path", metavar="IMAGE", type=click.Path(dir_okay=False, path_type=Path))
@_smp_port_option
@_smp_udp_option
@pass_cli
@reports_errors
def update_command(
    cli: CliContext, name: str, image_path: Path, smp_port: str | None, smp_udp: str | None
) -> None:
    """Upload IMAGE to NAME, test it, reset, check the new version runs, and confirm it.

    An interrupted update (Ctrl-C, a lost link) resumes where it stopped when the same
    command runs again.
    """
    from devicebridge.app import App
    from devicebridge.cli.devices import open_registry, paired_device
    from devicebridge.firmware import UpdateOutcome, load_image

    with open_registry(cli) as registry:
        paired = paired_device(registry, name)
    image = load_image(image_path)
    # Refused here, before anything connects: a wrong image never costs a byte.
    image.check_model(paired.model, device=paired.name)
    cli.console.print(
        f"{paired.name}: updating to {image.version_text} ({image.size_bytes} bytes, "
        f"sha256 {image.hash.hex()[:HASH_SHOWN_CHARS]}...)",
        highlight=False,
        markup=False,
    )
    view: _ProgressView | None = None

    async def go() -> UpdateResult:
        nonlocal view
        async with App(cli.options) as app:
            updater = _updater_for(app, paired, smp_port, smp_udp)
            try:
                with _ProgressView(cli.console, image) as view:
                    result = await updater.update(
                        image, on_progress=view.progress, on_phase=view.phase
                    )
            finally:
                await updater.close()
            if result.outcome is not UpdateOutcome.REVERTED:
                with app.open_registry() as registry:
                    registry.record_firmware(paired.serial_number, result.running_version)
            return result

    try:
        result = run(go())
    except KeyboardInterrupt:
        cli.error_console.print(
            _interrupted_line(view, paired.name), highlight=False, markup=False, soft_wrap=True
        )
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    cost = (
        f"{result.wire_bytes_sent} bytes sent for a {result.image_bytes}-byte image, "
        f"{result.reconnects} reconnect(s)"
    )
    if result.outcome is UpdateOutcome.ALREADY_RUNNING:
        cli.console.print(
            f"{paired.name} already runs {result.running_version} (this image); nothing to do.",
            highlight=False,
            markup=False,
        )
    elif result.outcome is UpdateOutcome.UPDATED:
        cli.console.print(
            f"{paired.name} now runs {result.running_version} (was {result.old_version}), "
            f"confirmed; {cost}.",
            highlight=False,
            markup=False,
        )
    else:
        cli.error_console.print(
            f"{paired.name} came back on its OLD firmware {result.running_version}: the new "
            f"image {result.new_version} did not boot and MCUboot restored the old one. "
            "Nothing was confirmed; the new image stays in the secondary slot.",
            highlight=False,
            markup=False,
        )
        raise click.exceptions.Exit(EXIT_ERROR)
