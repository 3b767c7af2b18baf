"""Routine commands: ``routine validate|list|copy`` (``sign``/``push`` load from
cli/service.py), ``run``, ``history``, ``report``, ``treatment``.

A routine file is parsed and checked against the policy before anything else happens: a
malformed or unsafe file never causes a connection, let alone a command to a device.
The light commands (``routine list``, ``history``, ``treatment ...``) import the pure
cores and the stores only; ``run`` and ``report`` import the runner, bleak and numpy
inside their functions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from devicebridge.cli.base import (
    EXIT_INTERRUPTED,
    POSITIVE_S,
    CliContext,
    LazyGroup,
    choices_text,
    echo_json,
    fmt,
    lazy,
    pass_cli,
    print_error,
    reports_errors,
    run,
    writable_data_dir,
)
from devicebridge.cli.table import Table, echo_fields
from devicebridge.cli.words import (
    a_kind,
    channel_words,
    duration_words,
    kind_words,
    zone_words,
)
from devicebridge.errors import CliInputError

if TYPE_CHECKING:
    from devicebridge.app import App
    from devicebridge.cli.views import GuidanceView
    from devicebridge.core.cooldown import TreatmentBlock
    from devicebridge.core.policy import SafetyPolicy
    from devicebridge.core.routine import Routine
    from devicebridge.device.transport.base import Transport
    from devicebridge.reporting.report import SessionReport
    from devicebridge.run.summary import RunSummary
    from devicebridge.storage.sessions import SessionStore

EXIT_INVALID: Final = 1
SIM_HAND_LEAD_IN_S: Final = 1.0
DEFAULT_RUN_LIMIT_S: Final = 3600.0


# --------------------------------------------------------------------------- loading


def load_policy(path: Path | None) -> SafetyPolicy:
    from devicebridge.core.policy import PolicyError, default_policy, parse_policy

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


def routine_source(spec: str) -> tuple[str, str]:
    """(TOML text, label) of a routine file path, or of a starter routine by its id."""
    from devicebridge.core.library import starter_routines

    path = Path(spec)
    if path.suffix == ".toml" and not path.exists():
        stem_text = starter_routines().get(path.stem)
        if stem_text is not None and path.parent == Path("."):
            # "firming.toml" where no such file exists: the starter of that name.
            return stem_text, f"starter {path.stem}"
    if path.suffix == ".toml" or path.exists():
        try:
            # Bytes as they are (no newline translation): what is signed is the file.
            return path.read_bytes().decode("utf-8"), str(path)
        except UnicodeDecodeError:
            raise CliInputError(f"{spec}: not a text file (UTF-8)") from None
        except OSError as exc:
            raise CliInputError(f"{spec}: cannot read the routine: {exc.strerror}") from exc
    starters = starter_routines()
    text = starters.get(spec)
    if text is None:
        raise CliInputError(
            f"{spec}: no such routine file, and no starter routine of that name "
            f"({choices_text(list(starters), spec)})"
        )
    return text, f"starter {spec}"


def resolve_routine(spec: str, policy: SafetyPolicy) -> Routine:
    """A routine file path, or the id of a starter routine, parsed against ``policy``."""
    from devicebridge.core.routine import RoutineError, parse_routine

    text, label = routine_source(spec)
    try:
        return parse_routine(text, policy, label=label)
    except RoutineError as exc:
        count = len(exc.problems)
        raise CliInputError(
            f"{label}: {count} problem{'s' if count != 1 else ''}, nothing was sent to a "
            f"device:\n{exc}"
        ) from exc


def open_store(cli: CliContext) -> SessionStore:
    from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore

    return SessionStore(writable_data_dir(cli) / SESSIONS_FILENAME)


# --------------------------------------------------------------------------- routine ...


@click.group(
    "routine",
    cls=LazyGroup,
    lazy_commands={
        "sign": lazy("devicebridge.cli.service:sign_command", "Sign a routine for one bridge."),
        "push": lazy("devicebridge.cli.service:push_command", "Push a routine to a bridge."),
    },
)
def routine_group() -> None:
    """Routine files: check, list, copy, sign and push them."""


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
    from devicebridge.core.routine import RoutineError, parse_routine

    policy = load_policy(policy_file)
    text, label = routine_source(str(file))
    try:
        routine = parse_routine(text, policy, label=label)
        if family is not None:
            _check_family(cli, family, routine, label)
    except RoutineError as exc:
        for problem in exc.problems:
            click.echo(problem.render(label))
        count = len(exc.problems)
        print_error(f"{label}: invalid, {count} problem{'s' if count != 1 else ''} (above)")
        raise click.exceptions.Exit(EXIT_INVALID) from None
    click.echo(
        f"{label}: ok: {routine.name!r}, {kind_words(routine.device_kind.value)}, "
        f"{len(routine.steps)} steps, {duration_words(routine.total_time_s)} (checked against "
        f"policy {policy.name!r})"
    )
    if not policy.knows_category(routine.category):
        click.echo(
            f"{label}: note: category {routine.category!r} is not one the policy knows "
            f"({', '.join(policy.known_categories)}): every frequency rule of the policy "
            "applies to it"
        )


def _check_family(cli: CliContext, family_id: str, routine: Routine, label: str) -> None:
    """Raise RoutineError with every step a device of ``family_id`` cannot run."""
    from devicebridge.core.catalogue import load_catalogue
    from devicebridge.core.device_fit import device_problems
    from devicebridge.core.tomlpath import Problem, locate
    from devicebridge.errors import RoutineError

    catalogue = load_catalogue(cli.settings.device_catalogue_dir)
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
@reports_errors
def list_command(as_json: bool) -> None:
    """The starter library: id, name, device kind, category, total time."""
    from devicebridge.core.library import starter_routines
    from devicebridge.core.policy import default_policy
    from devicebridge.core.routine import parse_routine

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
        echo_json(rows)
        return
    table = Table(
        ("id", "name", "device", "steps", "total"),
        title="Starter routines (devicebridge run ID --device NAME)",
    )
    for row in rows:
        table.add_row(
            row["id"],
            row["name"],
            kind_words(row["device_kind"]),
            str(row["steps"]),
            duration_words(row["total_s"]),
        )
    table.echo()


@routine_group.command("copy")
@click.argument("starter")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@reports_errors
def copy_command(starter: str, file: Path | None) -> None:
    """Copy starter routine STARTER to FILE (default: STARTER.toml here) to adapt it."""
    from devicebridge.core.library import starter_routines

    starters = starter_routines()
    text = starters.get(starter)
    if text is None:
        raise CliInputError(
            f"no starter routine {starter!r} ({choices_text(list(starters), starter)})"
        )
    target = file or Path(f"{starter}.toml")
    try:
        with target.open("x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        raise CliInputError(f"{target} exists already; give another FILE") from None
    click.echo(
        f"{target}: a copy of starter {starter!r}; check it with: "
        f"devicebridge routine validate {target}"
    )


# --------------------------------------------------------------------------- run


def echo_run_summary(result: RunSummary) -> None:
    """The end-of-run summary, one field per line (no table header to leave empty)."""
    summary = result.summary
    stored = f", session {result.session_id}" if result.session_id is not None else ""
    rows = [
        ("status", result.status + (f" ({result.end_reason})" if result.end_reason else "")),
        (
            "completion",
            f"{float(summary.get('completion', 0.0)) * 100:.0f} % "
            f"({summary.get('steps_done')}/{summary.get('steps_total')} steps)",
        ),
    ]
    if "time_s_by_zone" in summary:
        for zone, seconds in summary["time_s_by_zone"].items():
            rows.append((f"time {zone_words(zone)}", f"{seconds:.1f} s (by the clock)"))
    if "contact_s_by_zone" in summary:
        for zone, seconds in summary["contact_s_by_zone"].items():
            rows.append((f"contact {zone_words(zone)}", f"{seconds:.1f} s"))
        rows += [
            (
                "time in band",
                f"{summary['time_in_band_s']:.1f} s of {summary['contact_s']:.1f} s "
                f"({summary['in_band_fraction'] * 100:.0f} %)",
            ),
            ("out-of-band events", str(summary["out_of_band_events"])),
            ("above-cap events", str(summary["cap_events"])),
        ]
    if "dose_j_cm2" in summary:
        for ch, dose in summary["dose_j_cm2"].items():
            rows.append((f"dose {channel_words(ch)}", f"{dose:.2f} J/cm²"))
    rows.append(("warnings", str(summary.get("warnings", 0))))
    for what, how in (summary.get("checks") or {}).items():
        rows.append((what.replace("_", " "), str(how)))
    if summary.get("gaps"):
        rows.append(("telemetry gaps", f"{summary['gaps']} ({summary['lost_samples']} lost)"))
    echo_fields(rows, title=f"Summary: {summary.get('routine', 'routine')}{stored}")


@click.command("run")
@click.argument("routine_spec", metavar="ROUTINE", required=False)
@click.option(
    "--program",
    "program_id",
    type=int,
    default=None,
    help="Run program ID pushed by your therapist (devicebridge programs) instead of ROUTINE.",
)
@click.option(
    "--device",
    "device_name",
    default=None,
    help="Paired device name or serial (default: the one paired device of the routine's kind).",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Safety policy file (default: the shipped policy).",
)
@click.option(
    "--duration-s",
    type=POSITIVE_S,
    default=None,
    help="Stop after this long (seconds of device time); the session is stored as stopped.",
)
@click.option("--fast", is_flag=True, help="Simulated devices run as fast as possible.")
@click.option(
    "--mode",
    type=click.Choice(["auto", "device", "host"]),
    default="auto",
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
    """Run ROUTINE (a file or a starter id), or --program ID, with live guidance.

    When `devicebridge serve` runs on the same data directory, the routine runs on it
    (it holds the devices' links): same guidance, recorded and published by the bridge.
    """
    from dataclasses import replace

    from devicebridge.app import App
    from devicebridge.cli.views import GuidanceView, spinner
    from devicebridge.errors import BridgeRefusedError
    from devicebridge.run.recovery import recover_sessions
    from devicebridge.run.runner import RoutineRunner, RunMode
    from devicebridge.service import local_api
    from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore

    if (routine_spec is None) == (program_id is None):
        raise CliInputError("give either ROUTINE (a file or a starter id) or --program ID")
    data_dir = writable_data_dir(cli)
    program_label = None
    policy = load_policy(policy_file)
    if program_id is not None:
        routine_text, program_label = _program_text(data_dir, program_id)
        routine = _parse_or_refuse(routine_text, policy, program_label)
    else:
        assert routine_spec is not None
        # Parsed and checked before any connection: a bad file never reaches a device.
        routine = resolve_routine(routine_spec, policy)
    options = replace(cli.options, sim_fast=cli.sim_fast or fast)
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
        async with App(options) as app:
            with SessionStore(data_dir / SESSIONS_FILENAME) as store:
                recover_sessions(store, policy)
                transport, name, serial = await _device_for(
                    app, device_name, serial_port, routine.device_kind.value
                )
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
                await runner.admit()  # refused: nothing is sent to the device
                try:
                    async with spinner(
                        f"Connecting to {name}", app.clock.now_s, app.settings.scan_timeout_s
                    ):
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
        click.echo(
            "Stopped: the device was told to stop, and the session is recorded as stopped "
            "(devicebridge history).",
            err=True,
        )
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    echo_run_summary(result)


def _program_text(data_dir: Path, program_id: int) -> tuple[str, str]:
    """The routine text of stored program ``program_id`` and a label naming it."""
    from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore

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
    from devicebridge.core.routine import RoutineError, parse_routine

    try:
        return parse_routine(text, policy, label=label)
    except RoutineError as exc:
        raise CliInputError(f"{label} does not pass this policy:\n{exc}") from exc


async def _device_for(
    app: App, device_name: str | None, serial_port: str | None, kind: str
) -> tuple[Transport, str, str | None]:
    """The device to run a routine for ``kind`` on: named, or the only one of that kind.

    Candidates are only devices of the routine's kind: paired ones first, then those in
    range. Several candidates, or none, is one line naming the ones there are.
    """
    from devicebridge.cli.devices import scan_with_spinner
    from devicebridge.device.transport.ble import matches

    with app.open_registry() as registry:
        paired_all = registry.list_devices()
    paired_names = [p.name for p in paired_all if p.kind == kind]
    kinds = f"{kind_words(kind)}s"
    wanted = device_name.casefold() if device_name is not None else None
    if wanted is not None:
        named = [p for p in paired_all if wanted in (p.name.casefold(), p.serial_number.casefold())]
        if named:
            paired = named[0]
            if paired.kind != kind:
                raise CliInputError(
                    f"--device {device_name}: {paired.name!r} is {a_kind(paired.kind)}; "
                    f"this routine is for {a_kind(kind)} "
                    f"({choices_text(paired_names, label=f'paired {kinds}')})"
                )
            return app.transport_for(paired, serial_port), paired.name, paired.serial_number
        if serial_port is not None:
            return app.serial_transport(serial_port), device_name or serial_port, None
    else:
        if len(paired_names) == 1:
            paired = next(p for p in paired_all if p.kind == kind)
            return app.transport_for(paired, serial_port), paired.name, paired.serial_number
        if len(paired_names) > 1:
            raise CliInputError(
                f"several paired {kinds} ({', '.join(paired_names)}): choose one with --device NAME"
            )
        if serial_port is not None:
            return app.serial_transport(serial_port), serial_port, None
    # Not paired: a device of the routine's kind in range, by serial number, address or
    # advertised name (or a unique prefix of the name).
    seen = [
        d for d in await scan_with_spinner(app, app.settings.scan_timeout_s) if d.kind_label == kind
    ]
    if wanted is None:
        candidates = seen
    else:
        exact = [d for d in seen if matches(d, wanted)]
        candidates = exact or [d for d in seen if d.name.casefold().startswith(wanted)]
    if len(candidates) == 1:
        found = candidates[0]
        return app.ble_transport(found), found.name, found.serial_number
    which = f"--device {device_name}" if device_name is not None else "--device NAME"
    not_paired = (
        f"not a paired {kind_words(kind)} "
        f"({choices_text(paired_names, device_name, label=f'paired {kinds}')}); "
        if device_name is not None
        else f"no paired {kind_words(kind)}; "
    )
    if candidates:
        listed = ", ".join(f"{d.name} ({d.serial_number})" for d in candidates)
        raise CliInputError(
            f"{which}: {not_paired}several {kinds} in range match: {listed}; give a serial number"
        )
    in_range = ", ".join(f"{d.name} ({d.serial_number})" for d in seen) or "none"
    raise CliInputError(
        f"{which}: {not_paired}none of that name in range ({kinds} in range: {in_range})"
    )


# --------------------------------------------------------------------------- history / report


def _device_names(cli: CliContext) -> dict[str, str]:
    from devicebridge.cli.devices import open_registry

    with open_registry(cli) as registry:
        return {d.serial_number: d.name for d in registry.list_devices()}


@click.command("history")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the most recent.")
@pass_cli
@reports_errors
def history_command(cli: CliContext, as_json: bool, limit: int | None) -> None:
    """Past sessions, newest first."""
    with open_store(cli) as store:
        records = store.sessions(limit=limit)
    names = _device_names(cli)
    rows: list[dict[str, Any]] = [
        {
            "id": r.id,
            "started_at": r.started_at.isoformat(),
            "routine": r.routine_name,
            "category": r.category,
            "device_serial": r.device_serial,
            "device_name": names.get(r.device_serial),
            "device_kind": r.device_kind,
            "status": r.status,
            "completion": r.summary.get("completion"),
            "end_reason": r.end_reason,
        }
        for r in records
    ]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No sessions yet (devicebridge run ROUTINE starts one).")
        return
    table = Table(("id", "started", "routine", "device", "status", "done", "why"), title="Sessions")
    for r in records:
        completion = r.summary.get("completion")
        table.add_row(
            str(r.id),
            r.started_at.astimezone().strftime("%Y-%m-%d %H:%M"),
            r.routine_name,
            names.get(r.device_serial, r.device_serial),
            r.status,
            "-" if completion is None else f"{float(completion) * 100:.0f}%",
            fmt(r.end_reason),
        )
    table.echo()


@click.command("report")
@click.argument("session_id", metavar="[SESSION]", type=int, required=False)
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
    session_id: int | None,
    png: Path | None,
    csv_file: Path | None,
    json_file: Path | None,
    fhir_file: Path | None,
    policy_file: Path | None,
) -> None:
    """The summary of SESSION (default: the latest); optionally a PNG plot, the telemetry
    as CSV or JSON, and the session as a FHIR R4 Bundle."""
    from devicebridge.reporting.report import (
        load_report,
        summary_lines,
        write_csv,
        write_json,
        write_png,
    )

    policy = load_policy(policy_file)
    with open_store(cli) as store:
        if session_id is None:
            latest = store.sessions(limit=1)
            if not latest:
                raise CliInputError("no sessions yet (devicebridge run ROUTINE starts one)")
            session_id = latest[0].id
        report = load_report(store, session_id, policy)
    for line in summary_lines(report):
        click.echo(line)
    if png is not None:
        write_png(report, png, policy)
        click.echo(f"plot written to {png}")
    if csv_file is not None:
        rows = write_csv(report, csv_file)
        click.echo(f"{rows} samples written to {csv_file}")
    if json_file is not None:
        rows = write_json(report, json_file)
        click.echo(f"{rows} samples written to {json_file}")
    if fhir_file is not None:
        write_fhir(cli, report, fhir_file)
        click.echo(f"FHIR R4 Bundle written to {fhir_file}")


def write_fhir(cli: CliContext, report: SessionReport, path: Path) -> None:
    """The session as a FHIR Bundle; the client is named by this bridge's id (a pseudonym)."""
    import json

    from devicebridge.cli.devices import open_registry
    from devicebridge.cli.service import default_bridge_id
    from devicebridge.clinic.fhir import DeviceFacts, report_bundle

    with open_registry(cli) as registry:
        paired = registry.find_by_serial(report.record.device_serial)
        firmware = registry.current_firmware(report.record.device_serial)
    device = DeviceFacts(
        report.record.device_serial,
        report.record.device_kind,
        paired.model if paired else None,
        firmware,
        paired.name if paired else None,
    )
    client = cli.settings.bridge_id or default_bridge_id()
    data = report_bundle(report, client_pseudonym=client, device=device)
    try:
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    except OSError as exc:
        raise CliInputError(f"{path}: cannot write the FHIR Bundle: {exc.strerror}") from exc


# --------------------------------------------------------------------------- treatments


@click.group("treatment")
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
    from devicebridge.core.policy import POLICY_ZONES, policy_zone

    zones = [z.strip() for z in text.split(",") if z.strip()]
    if not zones:
        raise CliInputError("--zones: give at least one zone, e.g. --zones cheek,nasolabial")
    unknown = [z for z in zones if policy_zone(z) not in POLICY_ZONES]
    if unknown:
        raise CliInputError(
            f"--zones: unknown zone {', '.join(unknown)} "
            f"({choices_text(list(POLICY_ZONES), unknown[0])})"
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
    from devicebridge.core.cooldown import local_time, treatment_blocks
    from devicebridge.core.policy import TREATMENTS

    if kind not in TREATMENTS:
        raise CliInputError(f"KIND: unknown treatment {kind!r} ({choices_text(TREATMENTS, kind)})")
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
    click.echo(
        f"Recorded {'planned ' if planned else ''}treatment {treatment_id}: {kind} on "
        f"{', '.join(zones)} at {local_time(performed)}; {_blocks_text(blocks)}"
    )


@treatment_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@policy_option
@pass_cli
@reports_errors
def treatment_list_command(cli: CliContext, as_json: bool, policy_file: Path | None) -> None:
    """Recorded treatments, and until when each blocks routines on its zones."""
    from devicebridge.core.cooldown import BlockKind, local_time, treatment_blocks

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
        echo_json(rows)
        return
    if not rows:
        click.echo("No treatments recorded.")
        return
    now = datetime.now(UTC)
    table = Table(
        ("id", "kind", "date", "zones", "massage blocked until", "any routine until", "note"),
        title="Treatments",
    )
    for t, blocks in zip(treatments, blocked, strict=True):
        table.add_row(
            str(t.id),
            t.kind.replace("_", " "),
            local_time(t.performed_at),
            ", ".join(zone_words(z) for z in t.zones),
            *(_until_cell(blocks.get(kind), now) for kind in BlockKind),
            t.note,
        )
    table.echo()


def _until_cell(block: TreatmentBlock | None, now: datetime) -> str:
    from devicebridge.core.cooldown import local_time

    if block is None:
        return "-"
    return local_time(block.until) + (" (over)" if now >= block.until else "")


@treatment_group.command("remove")
@click.argument("treatment_id", metavar="ID", type=int)
@pass_cli
@reports_errors
def treatment_remove_command(cli: CliContext, treatment_id: int) -> None:
    """Forget treatment ID (see `treatment list`), e.g. one recorded with a wrong date."""
    from devicebridge.core.cooldown import local_time

    with open_store(cli) as store:
        removed = store.remove_treatment(treatment_id)
    click.echo(
        f"Removed treatment {removed.id}: {removed.kind} on {', '.join(removed.zones)} at "
        f"{local_time(removed.performed_at)}"
    )
