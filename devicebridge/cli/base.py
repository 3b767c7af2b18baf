"""The ``devicebridge`` command group, its global options and shared helpers (click + rich).

Errors of devicebridge (device not found, unknown name, bad config, ...) print
one line that says what failed and where, and exit with status 1; only bugs
show a traceback. Output is plain text when stdout is not a terminal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from functools import update_wrapper
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from devicebridge.app import AppOptions, load_device_catalogue
from devicebridge.config import load_settings
from devicebridge.errors import DeviceBridgeError

EXIT_ERROR: Final = 1
PLAIN_WIDTH_COLUMNS: Final = 160

P = ParamSpec("P")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True, slots=True)
class CliContext:
    options: AppOptions
    console: Console
    error_console: Console


def fmt(value: float | int | bool | str | None, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if spec else str(value)


def reports_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a DeviceBridgeError into one line on stderr and exit status 1."""

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except DeviceBridgeError as exc:
            # soft_wrap: one error, one line, whatever the width (scripts grep for it).
            errors = Console(stderr=True, soft_wrap=True)
            # The message may hold brackets (paths, "devicebridge[clinic]"): never markup.
            errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise click.exceptions.Exit(EXIT_ERROR) from None

    return update_wrapper(wrapper, func)


def run(coro: Coroutine[Any, Any, R]) -> R:
    return asyncio.run(coro)


@click.group()
@click.option(
    "--simulate/--no-simulate",
    default=None,
    help="Use in-process simulated devices (default: 'simulate' in the config).",
)
@click.option("--sim-seed", type=int, default=None, help="Seed of the simulated devices.")
@click.option(
    "--sim-fast",
    is_flag=True,
    help="Run the simulated devices as fast as the CPU allows (scripts and tests).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the device registry lives (env DEVICEBRIDGE_DATA_DIR).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (env DEVICEBRIDGE_CONFIG).",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
@reports_errors
def main(
    ctx: click.Context,
    simulate: bool | None,
    sim_seed: int | None,
    sim_fast: bool,
    data_dir: Path | None,
    config_file: Path | None,
    verbose: int,
) -> None:
    """Bridge between this computer and facial-care devices (BLE and serial)."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    settings, _ = load_settings(config_file)
    # The device catalogue is checked before any command runs, as the configuration is.
    load_device_catalogue(settings.device_catalogue_dir)
    options = AppOptions(
        settings=settings,
        simulate=settings.simulate if simulate is None else simulate,
        sim_seed=settings.sim_seed if sim_seed is None else sim_seed,
        data_dir=data_dir,
        sim_fast=sim_fast,
    )
    console = Console()
    if not console.is_terminal:
        # Piped or captured: no terminal width to honour, so do not truncate tables
        # or wrap log-style lines at rich's default of 80 columns.
        console = Console(width=PLAIN_WIDTH_COLUMNS, soft_wrap=True)
    ctx.obj = CliContext(options, console, Console(stderr=True, soft_wrap=True))


pass_cli = click.make_pass_decorator(CliContext)
