"""The ``devicebridge`` command group, its global options and shared helpers.

Start-up: the group knows every command by name, module and short help
(:data:`COMMANDS`) and imports a command's module only when that command runs, so
``devicebridge --help`` and the light commands (``devices``, ``history``, ``status``, ...)
start without bleak, numpy, aiomqtt, cryptography or rich. A command module keeps its
heavy imports inside the functions that need them; ``tests/cli/test_startup.py`` checks
what each light command loads, and ``python -m bench cli`` times them.

Failures: an error of devicebridge (device not found, unknown name, bad config, a data
directory that cannot be written, ...) and an operating-system error (a missing file, a
read-only folder) print one line on stderr that says what failed and what to do, and exit
with status 1; only bugs show a traceback. Nothing a user or a device supplies is ever
interpreted as markup: plain text goes through :func:`click.echo`, rich output through
``Text`` objects or ``markup=False``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from functools import update_wrapper
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, ParamSpec, TypeVar

import click

from devicebridge import __version__
from devicebridge.errors import (
    BluetoothUnavailableError,
    DataDirError,
    DeviceBridgeError,
)

if TYPE_CHECKING:
    from rich.console import Console

    from devicebridge.app import AppOptions
    from devicebridge.config import Settings

EXIT_ERROR: Final = 1
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
PROGRAM_NAME: Final = "devicebridge"
PLAIN_WIDTH_COLUMNS: Final = 160
# Durations and timeouts on the command line: seconds, above zero.
POSITIVE_S: Final = click.FloatRange(min=0, min_open=True)

P = ParamSpec("P")
R = TypeVar("R")

# What to do next, after the one line an error prints.
ERROR_HINTS: Final[Mapping[type[DeviceBridgeError], str]] = {
    BluetoothUnavailableError: "try --simulate or --serial-port PATH",
}


# --------------------------------------------------------------------------- context


class CliContext:
    """What the global options decided, shared by every command (``ctx.obj``).

    The configuration file is read when a command first needs a setting: a command that
    needs none (``routine list``) neither reads it nor pays for loading it. A plain class,
    not a dataclass: every command pays for its definition at start-up.
    """

    __slots__ = (
        "_console",
        "_error_console",
        "_loaded",
        "config_file",
        "data_dir_override",
        "sim_fast",
        "sim_seed_option",
        "simulate_option",
        "verbose",
    )

    def __init__(
        self,
        *,
        config_file: Path | None = None,
        simulate: bool | None = None,
        sim_seed: int | None = None,
        data_dir_override: Path | None = None,
        sim_fast: bool = False,
        verbose: int = 0,
    ) -> None:
        self.config_file = config_file
        self.simulate_option = simulate
        self.sim_seed_option = sim_seed
        self.data_dir_override = data_dir_override
        self.sim_fast = sim_fast
        self.verbose = verbose
        self._loaded: tuple[Settings, Path] | None = None
        self._console: Console | None = None
        self._error_console: Console | None = None

    def _load(self) -> tuple[Settings, Path]:
        if self._loaded is None:
            from devicebridge.config import load_settings

            loaded = load_settings(self.config_file)
            if loaded[0].device_catalogue_dir is not None:
                # Families of the user's own are checked as the configuration is, before
                # the command does anything (the shipped ones are checked by the tests).
                from devicebridge.core.catalogue import load_catalogue

                load_catalogue(loaded[0].device_catalogue_dir)
            self._loaded = loaded
        return self._loaded

    @property
    def settings(self) -> Settings:
        """The configuration file's settings (read on first use; errors name the key)."""
        return self._load()[0]

    @property
    def config_path(self) -> Path:
        from devicebridge.config import config_path

        return config_path(self.config_file)[0]

    @property
    def simulate(self) -> bool:
        return self.settings.simulate if self.simulate_option is None else self.simulate_option

    @property
    def sim_seed(self) -> int:
        return self.settings.sim_seed if self.sim_seed_option is None else self.sim_seed_option

    @property
    def data_dir(self) -> Path:
        """Where this command's data lives (only the path: nothing is created here)."""
        from devicebridge.config import data_dir

        return data_dir(self.data_dir_override, self.settings)

    @property
    def options(self) -> AppOptions:
        """The options of an :class:`~devicebridge.app.App`: a command that works with
        devices. Logging is set up here, for the work that logs."""
        from devicebridge.app import AppOptions

        configure_logging(self.verbose)
        return AppOptions(
            settings=self.settings,
            simulate=self.simulate,
            sim_seed=self.sim_seed,
            data_dir=self.data_dir_override,
            sim_fast=self.sim_fast,
        )

    @property
    def console(self) -> Console:
        """A rich console on stdout, made on first use (rich is not imported before)."""
        if self._console is None:
            from rich.console import Console

            console = Console()
            if not console.is_terminal:
                # Piped or captured: no terminal width to honour, so do not truncate
                # tables or wrap log-style lines at rich's default of 80 columns.
                console = Console(width=PLAIN_WIDTH_COLUMNS, soft_wrap=True)
            self._console = console
        return self._console

    @property
    def error_console(self) -> Console:
        if self._error_console is None:
            from rich.console import Console

            self._error_console = Console(stderr=True, soft_wrap=True)
        return self._error_console


def fmt(value: float | int | bool | str | None, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if spec else str(value)


def echo_json(value: object) -> None:
    """Write ``value`` as JSON to stdout: the only thing a ``--json`` command writes there."""
    import json

    click.echo(json.dumps(value, indent=2))


# --------------------------------------------------------------------------- errors


def error_line(exc: BaseException) -> str:
    """The one line an expected failure prints (without the ``error:`` prefix)."""
    if isinstance(exc, DeviceBridgeError):
        message = str(exc)
        for cls, hint in ERROR_HINTS.items():
            if isinstance(exc, cls):
                message = f"{message}; {hint}"
        return message
    if isinstance(exc, OSError):
        what = exc.filename if exc.filename is not None else ""
        reason = exc.strerror or str(exc)
        return f"{what}: {reason}" if what else reason
    return str(exc)


def print_error(message: str) -> None:
    """``error: message`` on stderr; the lines of a list the message carries (a routine's
    problems) follow, indented."""
    first, *details = message.splitlines() or [""]
    click.echo(f"{click.style('error:', fg='red', bold=True)} {first}", err=True)
    for line in details:
        click.echo(f"  {line}", err=True)


def reports_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn an expected failure into one line on stderr and exit status 1.

    Expected: a :class:`DeviceBridgeError`, and an :class:`OSError` (a file that is
    missing or cannot be written: the environment, not a bug). Anything else is a bug
    and keeps its traceback.
    """

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (DeviceBridgeError, OSError) as exc:
            print_error(error_line(exc))
            raise click.exceptions.Exit(EXIT_ERROR) from None
        except Exception as exc:
            # A store the disk cannot hold (full, read-only under our feet): sqlite3's
            # OperationalError, told apart without importing sqlite3 for every command.
            if type(exc).__module__ != "sqlite3" or type(exc).__name__ != "OperationalError":
                raise
            print_error(f"the database in the data directory failed: {exc}")
            raise click.exceptions.Exit(EXIT_ERROR) from None

    return update_wrapper(wrapper, func)


def configure_logging(verbose: int) -> None:
    """Log lines on stderr: warnings, or more with -v (-vv: debug).

    Called by the commands that work with devices (through :attr:`CliContext.options`)
    and for -v; the light commands skip importing logging (a stray warning there is
    still printed, by Python's last-resort handler).
    """
    import logging

    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def run(coro: Coroutine[Any, Any, R]) -> R:
    import asyncio  # here: the light commands never start an event loop

    return asyncio.run(coro)


def writable_data_dir(cli: CliContext) -> Path:
    """The data directory, created (private) if missing; one clear error when it cannot be
    created or written, before any store opens a file in it."""
    from devicebridge.storage.files import private_directory

    path = cli.data_dir
    origin = _data_dir_origin(cli)
    if path.exists() and not path.is_dir():
        raise DataDirError(f"{path} is not a directory", path=path, origin=origin)
    try:
        private_directory(path)
    except OSError as exc:
        raise DataDirError(
            f"cannot create {path}: {exc.strerror or exc}", path=path, origin=origin
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(path) else "no write permission"
        raise DataDirError(f"{path} is not writable ({reason})", path=path, origin=origin)
    return path


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _data_dir_origin(cli: CliContext) -> str:
    from devicebridge.config import DATA_DIR_ENV

    if cli.data_dir_override is not None:
        return "--data-dir"
    if os.environ.get(DATA_DIR_ENV):
        return DATA_DIR_ENV
    if cli.settings.data_dir is not None:
        return f"data_dir in {cli.config_path}"
    return "the platform's user data directory"


def closest(wanted: str, names: Iterable[str]) -> str | None:
    """The name closest to ``wanted`` (case-insensitive): a near spelling, or a name that
    the text contains (or that contains it), if any."""
    import difflib

    by_folded = {name.casefold(): name for name in names}
    folded = wanted.casefold()
    match = difflib.get_close_matches(folded, list(by_folded), n=1, cutoff=0.6)
    if match:
        return by_folded[match[0]]
    inside = [n for n in by_folded if n and (n in folded or folded in n)]
    return by_folded[max(inside, key=len)] if inside else None


def choices_text(
    names: Sequence[str], wanted: str | None = None, *, label: str = "known", none: str = "none"
) -> str:
    """``"known: a, b; did you mean 'a'?"`` for one error line."""
    if not names:
        return f"{label}: {none}"
    text = f"{label}: " + ", ".join(names)
    near = closest(wanted, names) if wanted is not None else None
    return f"{text}; did you mean {near!r}?" if near is not None else text


# --------------------------------------------------------------------------- lazy group


class LazyCommand(NamedTuple):
    """A command known by where it lives and what it does, imported when it runs."""

    target: str  # "package.module:attribute"
    short_help: str  # shown by --help, loaded or not


class LazyGroup(click.Group):
    """A group whose commands are imported on first use.

    ``--help`` lists every command with its short help without importing any of them;
    running one imports only its module.
    """

    def __init__(
        self, *args: Any, lazy_commands: Mapping[str, LazyCommand] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands: dict[str, LazyCommand] = dict(lazy_commands or {})

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """click's ``main``, with a usage error in one line: what is wrong, where to look."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else PROGRAM_NAME
            print_error(f"{exc.format_message()} (see '{where} --help')")
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            print_error(exc.format_message())
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(EXIT_ERROR)
        sys.exit(result if isinstance(result, int) else 0)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        entry = self.lazy_commands.get(cmd_name)
        if entry is None:
            return None
        module_name, _, attribute = entry.target.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):  # pragma: no cover - a wiring bug
            raise TypeError(f"{entry.target} is not a click command")
        # The table is the one place for a command's short help: the same text whether
        # the command is loaded or not.
        command.short_help = entry.short_help
        self.add_command(command, cmd_name)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = str(args[0])
        if (
            name not in self.lazy_commands
            and name not in self.commands
            and not name.startswith("-")
        ):
            near = closest(name, self.list_commands(ctx))
            hint = f"; did you mean {near!r}?" if near else ""
            ctx.fail(f"no such command {name!r}{hint}")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: list[tuple[str, str]] = []
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max((len(n) for n in names), default=0)
        for name in names:
            entry = self.lazy_commands.get(name)
            if entry is not None and name not in self.commands:
                help_text = click.Command(name, help=entry.short_help).get_short_help_str(limit)
            else:
                command = self.get_command(ctx, name)
                if command is None or command.hidden:
                    continue
                help_text = command.get_short_help_str(limit)
            rows.append((name, help_text))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def shell_complete(
        self, ctx: click.Context, incomplete: str
    ) -> list[click.shell_completion.CompletionItem]:
        from click.shell_completion import CompletionItem

        if incomplete.startswith("-"):
            return super().shell_complete(ctx, incomplete)
        return [
            CompletionItem(name, help=self.lazy_commands[name].short_help)
            for name in self.list_commands(ctx)
            if name.startswith(incomplete) and name in self.lazy_commands
        ] + [
            CompletionItem(name, help=command.get_short_help_str())
            for name, command in self.commands.items()
            if name.startswith(incomplete) and name not in self.lazy_commands
        ]


def lazy(target: str, help_text: str) -> LazyCommand:
    return LazyCommand(target, help_text)


_CLI: Final = "devicebridge.cli."

COMMANDS: Final[Mapping[str, LazyCommand]] = {
    "scan": lazy(_CLI + "devices:scan_command", "List nearby facial-care devices."),
    "pair": lazy(_CLI + "devices:pair_command", "Pair a device and remember it."),
    "devices": lazy(_CLI + "devices:devices_command", "List paired devices."),
    "forget": lazy(_CLI + "devices:forget_command", "Forget the paired device NAME."),
    "watch": lazy(_CLI + "devices:watch_command", "Show live telemetry of the paired device NAME."),
    "demo": lazy(_CLI + "devices:demo_command", "Two simulated massagers and an LED mask, live."),
    "routine": lazy(_CLI + "routines:routine_group", "Routine files: check, list, sign, push."),
    "run": lazy(_CLI + "routines:run_command", "Run a routine with live guidance."),
    "history": lazy(_CLI + "routines:history_command", "Past sessions, newest first."),
    "report": lazy(_CLI + "routines:report_command", "A session's summary, plot and data."),
    "treatment": lazy(
        _CLI + "routines:treatment_group", "Aesthetic treatments that block routines."
    ),
    "serve": lazy(_CLI + "service:serve_command", "Keep devices connected; record and publish."),
    "status": lazy(_CLI + "service:status_command", "Whether a bridge runs here, and its state."),
    "therapist": lazy(
        _CLI + "service:therapist_group", "For therapists: signing keys and adherence."
    ),
    "trust": lazy(_CLI + "service:trust_group", "Therapist keys this bridge accepts."),
    "programs": lazy(_CLI + "programs:programs_group", "Programs pushed by therapists."),
    "firmware": lazy(_CLI + "firmware:firmware_group", "Device firmware over MCUmgr/SMP."),
    "clinic": lazy(_CLI + "clinic:clinic_group", "The therapists' web console (optional)."),
    "doctor": lazy(_CLI + "doctor:doctor_command", "Check this machine: Bluetooth, ports, data."),
    "config": lazy(_CLI + "settings:config_group", "The configuration file: where and what."),
}


# --------------------------------------------------------------------------- the group


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    python = ".".join(str(part) for part in sys.version_info[:3])
    click.echo(f"{PROGRAM_NAME} {__version__} (Python {python})")
    ctx.exit()


@click.group(cls=LazyGroup, lazy_commands=COMMANDS)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the version and exit.",
)
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
    type=click.Path(path_type=Path),
    default=None,
    help="Where devicebridge keeps its data (env DEVICEBRIDGE_DATA_DIR).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (env DEVICEBRIDGE_CONFIG).",
)
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
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
    if verbose:
        configure_logging(verbose)
    ctx.obj = CliContext(
        config_file=config_file,
        simulate=simulate,
        sim_seed=sim_seed,
        data_dir_override=data_dir,
        sim_fast=sim_fast,
        verbose=verbose,
    )


pass_cli = click.make_pass_decorator(CliContext)
