"""``devicebridge programs``: the programs therapists pushed to this bridge, and how often
each was run (``devicebridge run --program ID`` runs one)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from devicebridge.cli.base import (
    CliContext,
    choices_text,
    echo_json,
    fmt,
    pass_cli,
    reports_errors,
    writable_data_dir,
)
from devicebridge.cli.table import Table
from devicebridge.cli.words import kind_words
from devicebridge.errors import CliInputError

if TYPE_CHECKING:
    from devicebridge.storage.programs import StoredProgram
    from devicebridge.storage.sessions import SessionRecord


def _program_rows(cli: CliContext) -> list[dict[str, Any]]:
    from devicebridge.cli.routines import load_policy
    from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
    from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore

    data_dir = writable_data_dir(cli)
    policy = load_policy(None)
    store = ProgramStore(data_dir / PROGRAMS_FILENAME)
    try:
        programs = store.programs()
    finally:
        store.close()
    with SessionStore(data_dir / SESSIONS_FILENAME) as sessions:
        records = [r for r in sessions.sessions() if r.program_id]
    now = datetime.now(UTC)
    return [_row(p, records, policy, now) for p in programs]


def _row(
    program: StoredProgram, records: list[SessionRecord], policy: Any, now: datetime
) -> dict[str, Any]:
    from devicebridge.core.routine import RoutineError, parse_routine

    runs = [r for r in records if r.program_id == str(program.id) and r.status != "refused"]
    row: dict[str, Any] = {
        "program_id": program.id,
        "routine": program.routine_name,
        "device_kind": program.device_kind,
        "program_version": program.program_version,
        "therapist_id": program.therapist_id,
        "received_at": program.received_at.isoformat(),
        "expires_at": program.expires_at.isoformat(),
        "valid": program.expires_at > now,
        "installed_on": list(program.installed_on),
        "sessions": len(runs),
        "completed": sum(1 for r in runs if r.status == "completed"),
        "last_session_at": max((r.started_at for r in runs), default=None),
        "schedule": None,
        "sessions_in_window": None,
    }
    if row["last_session_at"] is not None:
        row["last_session_at"] = row["last_session_at"].isoformat()
    try:
        routine = parse_routine(program.program_text, policy, label=f"program {program.id}")
    except RoutineError:
        row["valid"] = False  # this bridge's policy no longer admits it
        return row
    if routine.schedule is not None:
        window = timedelta(days=routine.schedule.per_days)
        row["schedule"] = {
            "max_sessions": routine.schedule.max_sessions,
            "per_days": routine.schedule.per_days,
        }
        row["sessions_in_window"] = sum(1 for r in runs if now - r.started_at < window)
    return row


@click.group("programs", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def programs_group(ctx: click.Context, as_json: bool) -> None:
    """Programs pushed by therapists (devicebridge run --program ID runs one)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(programs_list_command, as_json=as_json)


@programs_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
@reports_errors
def programs_list_command(cli: CliContext, as_json: bool) -> None:
    """Each program: routine, therapist, expiry, where it is installed, how often it ran."""
    rows = _program_rows(cli)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("No programs yet (a therapist pushes them to `devicebridge serve`).")
        return
    table = Table(
        ("id", "routine", "for", "therapist", "expires", "sessions", "this period"),
        title="Programs (devicebridge run --program ID)",
    )
    for row in rows:
        schedule = row["schedule"]
        period = (
            f"{row['sessions_in_window']} of {schedule['max_sessions']} "
            f"in {schedule['per_days']:g} days"
            if schedule
            else "-"
        )
        expires = row["expires_at"][:16].replace("T", " ")
        table.add_row(
            str(row["program_id"]),
            f"{row['routine']} v{row['program_version']}",
            kind_words(row["device_kind"]),
            row["therapist_id"],
            expires if row["valid"] else f"{expires} (not valid)",
            f"{row['sessions']} ({row['completed']} completed)",
            period,
        )
    table.echo()


@programs_group.command("show")
@click.argument("program_id", type=int)
@pass_cli
@reports_errors
def programs_show_command(cli: CliContext, program_id: int) -> None:
    """The routine of program PROGRAM_ID, as the therapist wrote it."""
    from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore

    store = ProgramStore(writable_data_dir(cli) / PROGRAMS_FILENAME)
    try:
        programs = store.programs()
    finally:
        store.close()
    program = next((p for p in programs if p.id == program_id), None)
    if program is None:
        known = [str(p.id) for p in programs]
        raise CliInputError(
            f"no program {program_id} on this bridge ({choices_text(known, none='none yet')})"
        )
    click.echo(
        f"program {program.id}: {program.routine_name} v{program.program_version} from "
        f"{program.therapist_id}, expires {program.expires_at:%Y-%m-%d %H:%M} UTC, "
        f"installed on {fmt(', '.join(program.installed_on) or None)}"
    )
    click.echo(program.program_text)
