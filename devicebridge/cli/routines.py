"""Routine commands: ``routine validate|list``, ``run``, ``history``, ``report``, ``treatment``.

A routine file is parsed and checked against the policy before anything else happens: a
malformed or unsafe file never causes a connection, let alone a command to a device.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import click
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from devicebridge.app import App
from devicebridge.cli.base import CliContext, fmt, main, pass_cli, reports_errors, run
from devicebridge.core.catalogue import DeviceCatalogue
from devicebridge.core.cooldown import BlockKind, TreatmentBlock, local_time, treatment_blocks
from devicebridge.core.device_fit import device_problems
from devicebridge.core.engine import Decision, DecisionKind, PressureState
from devicebridge.core.library import starter_routines
from devicebridge.core.policy import (
    LED_CHANNELS,
    POLICY_ZONES,
    TREATMENTS,
    SafetyPolicy,
    default_policy,
    parse_policy,
    policy_zone,
)
from devicebridge.core.routine import Routine, parse_routine
from devicebridge.core.tomlpath import Problem, locate
from devicebridge.device.transport.base import Transport
from devicebridge.device.transport.ble import matches
from devicebridge.errors import (
    BridgeRefusedError,
    CliInputError,
    PolicyError,
    RoutineError,
    UnknownDeviceError,
)
from devicebridge.reporting.report import (
    SessionReport,
    load_report,
    summary_lines,
    write_csv,
    write_json,
    write_png,
)
from devicebridge.run.recovery import recover_sessions
from devicebridge.run.runner import RoutineRunner, RunMode
from devicebridge.run.summary import RunSummary
from devicebridge.run.view import RunnerState
from devicebridge.service import local_api
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore

EXIT_INVALID: Final = 1
LIVE_REFRESH_PER_S: Final = 8
PLAIN_STATE_INTERVAL_S: Final = 1.0
GAUGE_WIDTH: Final = 40
SIM_HAND_LEAD_IN_S: Final = 1.0
DEFAULT_RUN_LIMIT_S: Final = 3600.0


# --------------------------------------------------------------------------- loading


def load_policy(path: Path | None) -> SafetyPolicy:
    if path is None:
        return default_policy()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliInputError(f"{path}: cannot read the policy: {exc.strerror}") from exc
    try:
        return parse_policy(text, label=str(path))
    except PolicyError as exc:
        raise CliInputError(f"invalid policy {path}:\n{exc}") from exc


def resolve_routine(spec: str, policy: SafetyPolicy) -> Routine:
    """A routine file path, or the name of a starter routine (file stem or routine name)."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliInputError(f"{spec}: cannot read the routine: {exc.strerror}") from exc
        label = str(path)
    else:
        starters = starter_routines()
        text_or_none = starters.get(spec)
        if text_or_none is None:
            for stem, candidate in starters.items():
                routine = parse_routine(candidate, policy, label=stem)
                if routine.name.casefold() == spec.casefold():
                    text_or_none = candidate
                    break
        if text_or_none is None:
            raise CliInputError(
                f"{spec}: no such routine file, and no starter routine of that name "
                f"(starters: {', '.join(starters)})"
            )
        text, label = text_or_none, f"starter {spec}"
    try:
        return parse_routine(text, policy, label=label)
    except RoutineError as exc:
        count = len(exc.problems)
        raise CliInputError(
            f"{label}: {count} problem{'s' if count != 1 else ''}, nothing was sent to a "
            f"device:\n{exc}"
        ) from exc


def open_store(cli: CliContext) -> SessionStore:
    return SessionStore(App(cli.options).data_dir / SESSIONS_FILENAME)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


# --------------------------------------------------------------------------- routine ...


@main.group("routine")
def routine_group() -> None:
    """Routine files: check, list, sign and push them."""


@routine_group.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Check against this policy (default: the shipped policy).",
)
@click.option(
    "--family",
    default=None,
    help="Also check that devices of this catalogue family (ofcp, foreo...) can run it.",
)
@pass_cli
@reports_errors
def validate_command(
    cli: CliContext, file: Path, policy_file: Path | None, family: str | None
) -> None:
    """Check FILE: every problem with its line, key path and the policy rule that says so."""
    policy = load_policy(policy_file)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliInputError(f"{file}: cannot read: {exc.strerror}") from exc
    try:
        routine = parse_routine(text, policy, label=str(file))
        if family is not None:
            _check_family(App(cli.options).catalogue, family, routine, str(file))
    except RoutineError as exc:
        for problem in exc.problems:
            cli.console.print(problem.render(str(file)), highlight=False, markup=False)
        count = len(exc.problems)
        cli.error_console.print(
            f"{file}: invalid, {count} problem{'s' if count != 1 else ''}", highlight=False
        )
        raise click.exceptions.Exit(EXIT_INVALID) from None
    cli.console.print(
        f"{file}: ok: {routine.name!r}, {routine.device_kind.value}, {len(routine.steps)} "
        f"steps, {_duration(routine.total_time_s)} (checked against policy {policy.name!r})",
        highlight=False,
        markup=False,
    )
    if not policy.knows_category(routine.category):
        cli.console.print(
            f"{file}: note: category {routine.category!r} is not one the policy knows "
            f"({', '.join(policy.known_categories)}): every frequency rule of the policy "
            "applies to it",
            highlight=False,
            markup=False,
        )


def _check_family(catalogue: DeviceCatalogue, family_id: str, routine: Routine, label: str) -> None:
    """Raise RoutineError with every step a device of ``family_id`` cannot run."""
    family = catalogue.family(family_id)
    if family is None:
        known = ", ".join(f.id for f in catalogue.families)
        raise CliInputError(f"--family {family_id}: not in the device catalogue ({known})")
    support = family.support(routine.device_kind)
    if support is None:
        problem = Problem(
            "routine.device_kind",
            f"{family.name} has no {routine.device_kind.value}",
            locate(routine.source_text, "routine.device_kind"),
        )
        raise RoutineError(label, [problem])
    problems = device_problems(routine, support, f"a {family.name} device")
    if problems:
        raise RoutineError(label, problems)


@routine_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@reports_errors
def list_command(cli: CliContext, as_json: bool) -> None:
    """The starter library: name, device kind, category, total time."""
    policy = default_policy()
    rows: list[dict[str, Any]] = []
    for stem, text in starter_routines().items():
        routine = parse_routine(text, policy, label=stem)
        rows.append(
            {
                "id": stem,
                "name": routine.name,
                "device_kind": routine.device_kind.value,
                "category": routine.category,
                "steps": len(routine.steps),
                "total_s": routine.total_time_s,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Starter routines (devicebridge run ID --device NAME)")
    for column in ("id", "name", "device", "category", "steps", "total"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["id"],
            row["name"],
            row["device_kind"],
            row["category"],
            str(row["steps"]),
            _duration(row["total_s"]),
        )
    cli.console.print(table)


# --------------------------------------------------------------------------- live guidance

STATE_LABELS: Final = {
    PressureState.NO_CONTACT: ("no contact", "dim"),
    PressureState.TOO_LOW: ("TOO LOW", "yellow"),
    PressureState.IN_BAND: ("in band", "green"),
    PressureState.TOO_HIGH: ("TOO HIGH", "yellow"),
    PressureState.ABOVE_CAP: ("ABOVE CAP", "bold red"),
}


def pressure_gauge(state: RunnerState, width: int = GAUGE_WIDTH) -> Text:
    """``[....====|....!]``: the target band as ``=``, the pressure as ``|``, the cap ``!``."""
    if state.band_kpa is None:
        return Text("")
    low, high = state.band_kpa
    cap = state.cap_kpa or high
    scale_kpa = max(cap * 1.25, (state.pressure_kpa or 0.0) * 1.05, high * 1.25)
    cells = ["."] * width
    for i in range(width):
        value = (i + 0.5) / width * scale_kpa
        if low <= value <= high:
            cells[i] = "="
    cap_cell = min(width - 1, int(cap / scale_kpa * width))
    cells[cap_cell] = "!"
    if state.pressure_kpa is not None and state.contact:
        cells[min(width - 1, int(state.pressure_kpa / scale_kpa * width))] = "|"
    label, style = STATE_LABELS[state.pressure_state or PressureState.NO_CONTACT]
    text = Text("[" + "".join(cells) + "] ")
    pressure = "-" if state.pressure_kpa is None else f"{state.pressure_kpa:5.1f} kPa"
    text.append(f"{pressure} {label}", style=style)
    text.append(f"  (target {low:g}-{high:g}, cap {cap:g})", style="dim")
    return text


def state_panel(state: RunnerState) -> Panel:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("step", f"{state.step}/{state.steps_total}  zone: {state.zone}")
    grid.add_row("do", state.guidance)
    grid.add_row(
        "time left",
        f"step {_duration(state.step_remaining_s)}, session {_duration(state.session_remaining_s)}"
        + ("  [PAUSED]" if state.paused else ""),
    )
    if state.band_kpa is not None:
        grid.add_row("pressure", pressure_gauge(state))
    if state.not_measured:
        what = ", ".join(m.replace("_", " ") for m in state.not_measured)
        grid.add_row(
            "checks",
            Text(
                f"{what}: not measured by this device"
                + (" (guided by time)" if state.by_time else ""),
                style="dim",
            ),
        )
    if state.dose_j_cm2 is not None:
        levels = state.irradiance_mw_cm2 or {}
        allowed = state.dose_allowed_j_cm2 or {}
        parts = [
            f"{ch}: {levels.get(ch, 0.0):.1f} mW/cm², {state.dose_j_cm2[ch]:.2f}"
            f"/{allowed.get(ch, 0.0):.1f} J/cm²"
            for ch in LED_CHANNELS
            if allowed.get(ch, 0.0) > 0 and (levels.get(ch, 0.0) > 0 or state.dose_j_cm2[ch] > 0)
        ]
        grid.add_row("light", "; ".join(parts) or "off")
    if state.skin_temperature_c is not None:
        grid.add_row("skin", f"{state.skin_temperature_c:.1f} °C")
    grid.add_row("warning", Text(state.last_warning or "-", style="yellow"))
    title = f"{state.routine} on {state.device} ({state.mode} mode, t={state.elapsed_s:.1f} s)"
    return Panel(grid, title=title)


def plain_state(state: RunnerState) -> str:
    parts = [
        f"step {state.step}/{state.steps_total}",
        f"zone={state.zone}",
        f"step_left={state.step_remaining_s:.1f}s",
        f"session_left={state.session_remaining_s:.1f}s",
    ]
    if state.band_kpa is not None:
        label = STATE_LABELS[state.pressure_state or PressureState.NO_CONTACT][0]
        pressure = fmt(state.pressure_kpa, ".1f")
        parts.append(
            f"pressure={pressure}kPa [{state.band_kpa[0]:g}-{state.band_kpa[1]:g}] {label}"
        )
    if state.dose_j_cm2 is not None:
        parts.append(
            "dose=" + "/".join(f"{state.dose_j_cm2[ch]:.2f}" for ch in LED_CHANNELS) + "J/cm2"
        )
    if state.by_time:
        parts.append("by_time")
    if state.paused:
        parts.append("PAUSED")
    return " ".join(parts)


def decision_line(device: str, decision: Decision) -> str:
    rule = f" (policy: {decision.rule})" if decision.rule else ""
    kind = decision.kind.value.upper()
    return f"[{device} t={decision.at_s:7.2f}s] {kind}: {decision.message}{rule}"


class GuidanceView:
    """Rich Live panels on a terminal; a line per decision and per second elsewhere."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.states: dict[str, RunnerState] = {}
        self._live: Live | None = None
        self._last_plain_s: dict[str, float] = {}

    def __enter__(self) -> GuidanceView:
        if self.console.is_terminal:
            self._live = Live(
                Text("connecting..."),
                console=self.console,
                refresh_per_second=LIVE_REFRESH_PER_S,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def on_state(self, state: RunnerState) -> None:
        self.states[state.device] = state
        if self._live is not None:
            self._live.update(Group(*(state_panel(s) for s in self.states.values())))
            return
        last = self._last_plain_s.get(state.device)
        if last is None or state.elapsed_s - last >= PLAIN_STATE_INTERVAL_S or state.finished:
            self._last_plain_s[state.device] = state.elapsed_s
            self.console.print(
                f"[{state.device} t={state.elapsed_s:7.2f}s] {plain_state(state)}",
                highlight=False,
                markup=False,
            )

    def on_decision(self, device: str, decision: Decision) -> None:
        if decision.kind is DecisionKind.GUIDANCE and decision.reason == "step_start":
            style = "bold"
        elif decision.kind in (DecisionKind.PAUSE, DecisionKind.STOP, DecisionKind.STOP_STEP):
            style = "bold red"
        elif decision.kind in (DecisionKind.WARNING, DecisionKind.LOWER_INTENSITY):
            style = "yellow"
        else:
            style = ""
        line = Text(decision_line(device, decision), style=style)
        if self._live is not None:
            self._live.console.print(line)
        else:
            self.console.print(line, highlight=False)


def summary_table(result: RunSummary) -> Table:
    stored = f", session {result.session_id}" if result.session_id is not None else ""
    table = Table(title=f"Summary: {result.summary.get('routine', 'routine')}{stored}")
    table.add_column("")
    table.add_column("")
    summary = result.summary
    table.add_row(
        "status", result.status + (f" ({result.end_reason})" if result.end_reason else "")
    )
    table.add_row(
        "completion",
        f"{float(summary.get('completion', 0.0)) * 100:.0f} % "
        f"({summary.get('steps_done')}/{summary.get('steps_total')} steps)",
    )
    if "time_s_by_zone" in summary:
        for zone, seconds in summary["time_s_by_zone"].items():
            table.add_row(f"time {zone}", f"{seconds:.1f} s (by the clock)")
    if "contact_s_by_zone" in summary:
        for zone, seconds in summary["contact_s_by_zone"].items():
            table.add_row(f"contact {zone}", f"{seconds:.1f} s")
        table.add_row(
            "time in band",
            f"{summary['time_in_band_s']:.1f} s of {summary['contact_s']:.1f} s "
            f"({summary['in_band_fraction'] * 100:.0f} %)",
        )
        table.add_row("out-of-band events", str(summary["out_of_band_events"]))
        table.add_row("above-cap events", str(summary["cap_events"]))
    if "dose_j_cm2" in summary:
        for ch, dose in summary["dose_j_cm2"].items():
            table.add_row(f"dose {ch}", f"{dose:.2f} J/cm²")
    table.add_row("warnings", str(summary.get("warnings", 0)))
    for what, how in (summary.get("checks") or {}).items():
        table.add_row(what.replace("_", " "), str(how))
    if summary.get("gaps"):
        table.add_row("telemetry gaps", f"{summary['gaps']} ({summary['lost_samples']} lost)")
    return table


# --------------------------------------------------------------------------- run


@main.command("run")
@click.argument("routine_spec", metavar="ROUTINE", required=False)
@click.option(
    "--program",
    "program_id",
    type=int,
    default=None,
    help="Run program ID pushed by your therapist (devicebridge programs) instead of ROUTINE.",
)
@click.option("--device", "device_name", default=None, help="Paired device name (or serial).")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Safety policy file (default: the shipped policy).",
)
@click.option(
    "--duration-s",
    type=float,
    default=None,
    help="Stop after this long (seconds of device time); the session is stored as stopped.",
)
@click.option("--fast", is_flag=True, help="Simulated devices run as fast as possible.")
@click.option(
    "--mode",
    type=click.Choice([m.value for m in RunMode]),
    default=RunMode.AUTO.value,
    show_default=True,
    help="device: install the routine as a program on the device; host: drive it from here.",
)
@click.option("--serial-port", default=None, help="Use this serial port for the device.")
@pass_cli
@reports_errors
def run_command(
    cli: CliContext,
    routine_spec: str | None,
    program_id: int | None,
    device_name: str | None,
    policy_file: Path | None,
    duration_s: float | None,
    fast: bool,
    mode: str,
    serial_port: str | None,
) -> None:
    """Run ROUTINE (a file or a starter name), or --program ID, with live guidance.

    When `devicebridge serve` runs on the same data directory, the routine runs on it
    (it holds the devices' links): same guidance, recorded and published by the bridge.
    """
    if (routine_spec is None) == (program_id is None):
        raise CliInputError("give either ROUTINE (a file or a starter name) or --program ID")
    data_dir = App(cli.options).data_dir
    program_label = None
    if program_id is not None:
        routine_text, program_label = _program_text(data_dir, program_id)
        policy = load_policy(policy_file)
        routine = _parse_or_refuse(routine_text, policy, program_label)
    else:
        assert routine_spec is not None
        policy = load_policy(policy_file)
        # Parsed and checked before any connection: a bad file never reaches a device.
        routine = resolve_routine(routine_spec, policy)
    options = replace(cli.options, sim_fast=cli.options.sim_fast or fast)
    limit_s = duration_s or DEFAULT_RUN_LIMIT_S

    async def on_bridge(view: GuidanceView) -> RunSummary | None:
        connection = await local_api.connect(data_dir)
        if connection is None:
            return None
        if policy_file is not None or serial_port is not None:
            connection[1].close()
            raise CliInputError(
                "a bridge (devicebridge serve) runs on this data directory and the routine "
                "runs on it, under its policy and on its links: drop --policy/--serial-port"
            )
        names: list[str] = []

        def started(device: str) -> None:
            names.append(device)

        request: dict[str, Any] = {
            "device": device_name,
            "program_id": program_id,
            "routine_text": None if program_id is not None else routine.source_text,
            "label": routine_spec or program_label,
            "mode": mode,
            "max_duration_s": limit_s,
        }
        try:
            return await local_api.run_on_bridge(
                connection,
                request,
                on_started=started,
                on_state=view.on_state,
                on_decision=lambda d: view.on_decision(names[0] if names else "bridge", d),
            )
        except BridgeRefusedError as exc:
            raise CliInputError(str(exc)) from None

    async def locally(view: GuidanceView) -> RunSummary:
        if device_name is None:
            raise CliInputError("--device NAME: which device to run it on (devicebridge devices)")
        async with App(options) as app:
            with SessionStore(app.data_dir / SESSIONS_FILENAME) as store:
                recover_sessions(store, policy)
                transport, name, serial = await _transport_for(app, device_name, serial_port)
                session = app.session(transport, routine.device_kind.value, name=name)
                runner = RoutineRunner(
                    session,
                    routine,
                    policy,
                    store=store,
                    device_serial=serial,
                    mode=RunMode(mode),
                    program_id=program_id,
                    on_update=view.on_state,
                    on_decision=lambda d: view.on_decision(name, d),
                )
                runner.admit()  # refused: nothing is sent to the device
                try:
                    await session.start()
                    if options.simulate:
                        app.script_simulated_hand(
                            session.device_info.serial_number,
                            routine,
                            policy,
                            lead_in_s=SIM_HAND_LEAD_IN_S,
                        )
                    return await runner.run(max_duration_s=limit_s)
                finally:
                    await session.close()

    async def go(view: GuidanceView) -> RunSummary:
        result = await on_bridge(view)
        return result if result is not None else await locally(view)

    try:
        with GuidanceView(cli.console) as view:
            result = run(go(view))
    except KeyboardInterrupt:
        cli.console.print("Stopped (the device was told to stop all).")
        return
    cli.console.print(summary_table(result))


def _program_text(data_dir: Path, program_id: int) -> tuple[str, str]:
    """The routine text of stored program ``program_id`` and a label naming it."""
    store = ProgramStore(data_dir / PROGRAMS_FILENAME)
    try:
        program = next((p for p in store.programs() if p.id == program_id), None)
    finally:
        store.close()
    if program is None:
        raise CliInputError(
            f"--program {program_id}: no such program on this bridge (devicebridge programs)"
        )
    if program.expires_at <= datetime.now(UTC):
        raise CliInputError(
            f"--program {program_id}: expired at {program.expires_at:%Y-%m-%d %H:%M} UTC; "
            "ask your therapist for a new one"
        )
    return program.program_text, f"program {program_id} ({program.routine_name})"


def _parse_or_refuse(text: str, policy: SafetyPolicy, label: str) -> Routine:
    try:
        return parse_routine(text, policy, label=label)
    except RoutineError as exc:
        raise CliInputError(f"{label} does not pass this policy:\n{exc}") from exc


async def _transport_for(
    app: App, device_name: str, serial_port: str | None
) -> tuple[Transport, str, str | None]:
    with app.open_registry() as registry:
        try:
            paired = registry.get(device_name)
        except UnknownDeviceError:
            paired = None
    if paired is not None:
        return app.transport_for(paired, serial_port), paired.name, paired.serial_number
    if serial_port is not None:
        return app.serial_transport(serial_port), device_name, None
    # Not paired: find it by serial number, address or advertised name (or a unique prefix).
    seen = await app.scan(app.settings.scan_timeout_s)
    wanted = device_name.casefold()
    exact = [d for d in seen if matches(d, device_name)]
    prefixed = [d for d in seen if d.name.casefold().startswith(wanted)]
    candidates = exact or prefixed
    if len(candidates) != 1:
        names = ", ".join(d.name for d in seen) or "none"
        why = "several devices match" if candidates else "no paired device and none in range"
        raise CliInputError(f"--device {device_name}: {why} (in range: {names})")
    found = candidates[0]
    return app.ble_transport(found), found.name, found.serial_number


# --------------------------------------------------------------------------- history / report


@main.command("history")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--limit", type=int, default=None, help="Only the most recent sessions.")
@pass_cli
@reports_errors
def history_command(cli: CliContext, as_json: bool, limit: int | None) -> None:
    """Past sessions, newest first."""
    with open_store(cli) as store:
        records = store.sessions(limit=limit)
    rows: list[dict[str, Any]] = [
        {
            "id": r.id,
            "started_at": r.started_at.isoformat(),
            "routine": r.routine_name,
            "category": r.category,
            "device_serial": r.device_serial,
            "device_kind": r.device_kind,
            "status": r.status,
            "completion": r.summary.get("completion"),
            "end_reason": r.end_reason,
        }
        for r in records
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        cli.console.print("No sessions yet.")
        return
    table = Table(title="Sessions")
    for column in ("id", "started", "routine", "device", "status", "completion", "why"):
        table.add_column(column)
    for r in records:
        completion = r.summary.get("completion")
        table.add_row(
            str(r.id),
            r.started_at.astimezone().strftime("%Y-%m-%d %H:%M"),
            r.routine_name,
            f"{r.device_serial} ({r.device_kind})",
            r.status,
            "-" if completion is None else f"{float(completion) * 100:.0f} %",
            fmt(r.end_reason),
        )
    cli.console.print(table)


@main.command("report")
@click.argument("session_id", metavar="SESSION", type=int)
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--fhir",
    "fhir_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the session as an HL7 FHIR R4 Bundle (needs the 'clinic' extra).",
)
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path))
@pass_cli
@reports_errors
def report_command(
    cli: CliContext,
    session_id: int,
    png: Path | None,
    csv_file: Path | None,
    json_file: Path | None,
    fhir_file: Path | None,
    policy_file: Path | None,
) -> None:
    """The summary of SESSION; optionally a PNG plot, the telemetry as CSV or JSON, and the
    session as a FHIR R4 Bundle."""
    policy = load_policy(policy_file)
    with open_store(cli) as store:
        report = load_report(store, session_id, policy)
    for line in summary_lines(report):
        cli.console.print(line, highlight=False, markup=False)
    if png is not None:
        write_png(report, png, policy)
        cli.console.print(f"plot written to {png}", highlight=False)
    if csv_file is not None:
        rows = write_csv(report, csv_file)
        cli.console.print(f"{rows} samples written to {csv_file}", highlight=False)
    if json_file is not None:
        rows = write_json(report, json_file)
        cli.console.print(f"{rows} samples written to {json_file}", highlight=False)
    if fhir_file is not None:
        write_fhir(cli, report, fhir_file)
        cli.console.print(f"FHIR R4 Bundle written to {fhir_file}", highlight=False)


def write_fhir(cli: CliContext, report: SessionReport, path: Path) -> None:
    """The session as a FHIR Bundle; the client is named by this bridge's id (a pseudonym)."""
    from devicebridge.cli.service import default_bridge_id
    from devicebridge.clinic.fhir import DeviceFacts, report_bundle

    app = App(cli.options)
    with app.open_registry() as registry:
        paired = registry.find_by_serial(report.record.device_serial)
        firmware = registry.current_firmware(report.record.device_serial)
    device = DeviceFacts(
        report.record.device_serial,
        report.record.device_kind,
        paired.model if paired else None,
        firmware,
        paired.name if paired else None,
    )
    client = cli.options.settings.bridge_id or default_bridge_id()
    data = report_bundle(report, client_pseudonym=client, device=device)
    try:
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    except OSError as exc:
        raise CliInputError(f"{path}: cannot write the FHIR Bundle: {exc.strerror}") from exc


# --------------------------------------------------------------------------- treatments


@main.group("treatment")
def treatment_group() -> None:
    """Aesthetic treatments: they block routines on the treated zones for a while."""


policy_option = click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Safety policy whose cool-downs apply (default: the shipped policy, as `run`).",
)


def _parse_zones(text: str) -> list[str]:
    zones = [z.strip() for z in text.split(",") if z.strip()]
    if not zones:
        raise CliInputError("--zones: give at least one zone, e.g. --zones cheek,nasolabial")
    unknown = [z for z in zones if policy_zone(z) not in POLICY_ZONES]
    if unknown:
        raise CliInputError(
            f"--zones: unknown zone {', '.join(unknown)}; known: {', '.join(POLICY_ZONES)}"
        )
    return list(dict.fromkeys(policy_zone(z) for z in zones))


def _blocks_text(blocks: tuple[TreatmentBlock, ...]) -> str:
    return "; ".join(block.describe() for block in blocks)


@treatment_group.command("add")
@click.argument("kind")
@click.option("--date", "date_text", required=True, help="YYYY-MM-DD (or YYYY-MM-DDTHH:MM).")
@click.option("--zones", "zones_text", required=True, help="Comma-separated, e.g. cheek,chin.")
@click.option("--note", default="", help="Free text (product, clinic).")
@click.option(
    "--allow-future",
    is_flag=True,
    help="Record a planned treatment: it blocks routines from its date on.",
)
@policy_option
@pass_cli
@reports_errors
def treatment_add_command(
    cli: CliContext,
    kind: str,
    date_text: str,
    zones_text: str,
    note: str,
    allow_future: bool,
    policy_file: Path | None,
) -> None:
    """Record a treatment KIND (botulinum_toxin, filler, tissue_stimulator, mesotherapy)."""
    if kind not in TREATMENTS:
        raise CliInputError(f"KIND: unknown treatment {kind!r}; known: {', '.join(TREATMENTS)}")
    try:
        performed = datetime.fromisoformat(date_text)
    except ValueError:
        raise CliInputError(f"--date: {date_text!r} is not a date like 2025-03-01") from None
    if performed.tzinfo is None:
        performed = performed.astimezone()  # the user's local time
    performed = performed.astimezone(UTC)
    planned = performed > datetime.now(UTC)
    if planned and not allow_future:
        # A mistyped year would otherwise block routines for as long as it is wrong.
        raise CliInputError(
            f"--date: {local_time(performed)} is in the future; a treatment blocks routines "
            "from its date on, so record it once it is done (or pass --allow-future to "
            "record a planned one)"
        )
    zones = _parse_zones(zones_text)
    blocks = treatment_blocks(load_policy(policy_file), kind, performed)
    with open_store(cli) as store:
        treatment_id = store.add_treatment(kind, performed, zones, note)
    cli.console.print(
        f"Recorded {'planned ' if planned else ''}treatment {treatment_id}: {kind} on "
        f"{', '.join(zones)} at {local_time(performed)}; {_blocks_text(blocks)}",
        highlight=False,
    )


@treatment_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@policy_option
@pass_cli
@reports_errors
def treatment_list_command(cli: CliContext, as_json: bool, policy_file: Path | None) -> None:
    """Recorded treatments, and until when each blocks routines on its zones."""
    policy = load_policy(policy_file)
    with open_store(cli) as store:
        treatments = store.treatments()
    blocked = [
        {b.kind: b for b in treatment_blocks(policy, t.kind, t.performed_at)} for t in treatments
    ]
    rows = [
        {
            "id": t.id,
            "kind": t.kind,
            "performed_at": t.performed_at.isoformat(),
            "zones": list(t.zones),
            "note": t.note,
            "blocked_until": {
                kind.value: block.until.isoformat() if (block := blocks.get(kind)) else None
                for kind in BlockKind
            },
        }
        for t, blocks in zip(treatments, blocked, strict=True)
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        cli.console.print("No treatments recorded.")
        return
    now = datetime.now(UTC)
    table = Table(title="Treatments")
    for column in (
        "id",
        "kind",
        "date",
        "zones",
        "massage blocked until",
        "any routine blocked until",
        "note",
    ):
        table.add_column(column)
    for t, blocks in zip(treatments, blocked, strict=True):
        table.add_row(
            str(t.id),
            t.kind,
            local_time(t.performed_at),
            ", ".join(t.zones),
            *(_until_cell(blocks.get(kind), now) for kind in BlockKind),
            t.note,
        )
    cli.console.print(table)


def _until_cell(block: TreatmentBlock | None, now: datetime) -> str:
    if block is None:
        return "-"
    return local_time(block.until) + (" (over)" if now >= block.until else "")


@treatment_group.command("remove")
@click.argument("treatment_id", metavar="ID", type=int)
@pass_cli
@reports_errors
def treatment_remove_command(cli: CliContext, treatment_id: int) -> None:
    """Forget treatment ID (see `treatment list`), e.g. one recorded with a wrong date."""
    with open_store(cli) as store:
        removed = store.remove_treatment(treatment_id)
    cli.console.print(
        f"Removed treatment {removed.id}: {removed.kind} on {', '.join(removed.zones)} at "
        f"{local_time(removed.performed_at)}",
        highlight=False,
    )
