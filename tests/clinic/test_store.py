"""The console's database (its migrations match the schema, a newer one is refused), the
optional extra, and the adherence rule."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import Engine, text

from devicebridge.cli import main
from devicebridge.clinic import ClinicExtraMissingError, require_extra
from devicebridge.clinic.db import migrate
from devicebridge.clinic.errors import DatabaseError
from devicebridge.clinic.queries import adherence
from devicebridge.clinic.schema import metadata


def test_the_migrations_make_exactly_the_schema_the_code_uses(engine: Engine) -> None:
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    assert differences == []
    assert migrate(engine) == "0001"  # again: nothing to do


def test_a_database_from_a_newer_console_is_refused(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(DatabaseError, match="newer devicebridge"):
        migrate(engine)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def without_starlette(name: str, *args: object) -> object:
        return None if name == "starlette" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", without_starlette)
    with pytest.raises(ClinicExtraMissingError, match=r"devicebridge\[clinic\]"):
        require_extra()
    result = CliRunner().invoke(main, ["clinic", "serve", "--broker", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert "pip install 'devicebridge[clinic]'" in result.output
    assert "Traceback" not in result.output


def test_adherence_counts_completed_sessions_per_period_and_a_streak() -> None:
    origin = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # the bridge received the program
    week = timedelta(days=7)

    def at(days: float) -> datetime:
        return origin + timedelta(days=days)

    # Weeks 0, 1 and 2 met (2 each), week 3 (now) has one so far.
    done = [at(1), at(4), at(8), at(12), at(15), at(19), at(22)]
    now = origin + 3 * week + timedelta(days=3)
    result = adherence(
        program_id=1,
        routine="Firming",
        origin=origin,
        target=2,
        per_days=7,
        completed_at=done,
        now=now,
    )
    assert (result.done, result.target, result.streak, result.period_name) == (1, 2, 3, "this week")
    assert not result.met
    # The second session of this week extends the streak at once.
    more = adherence(
        program_id=1,
        routine="Firming",
        origin=origin,
        target=2,
        per_days=7,
        completed_at=[*done, at(23)],
        now=now,
    )
    assert (more.done, more.streak, more.met) == (2, 4, True)
    # A missed week breaks it; sessions before the program or in the future do not count.
    broken = adherence(
        program_id=1,
        routine="Firming",
        origin=origin,
        target=2,
        per_days=7,
        completed_at=[at(-1), at(1), at(4), at(15), at(19), at(22), at(40)],
        now=now,
    )
    assert (broken.done, broken.streak) == (1, 1)
    # Without a schedule: the count only.
    free = adherence(
        program_id=2,
        routine="Relax",
        origin=origin,
        target=None,
        per_days=None,
        completed_at=done,
        now=now,
    )
    assert (free.target, free.done, free.streak) == (None, 7, 0)


def test_other_commands_do_not_load_the_console() -> None:
    heavy = ("starlette", "uvicorn", "sqlalchemy", "alembic", "jinja2", "argon2", "fhir")
    probe = (
        f"import sys, devicebridge.cli; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""


def test_the_vendored_browser_libraries_are_the_ones_built_with_their_licences() -> None:
    vendor = Path(__file__).resolve().parents[2] / "devicebridge" / "clinic" / "static" / "vendor"
    sums = (vendor / "SHA256SUMS").read_text("ascii").split("\n")
    checked = 0
    for line in filter(None, sums):
        digest, name = line.split()
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
        checked += 1
    assert checked == 3
    lock = json.loads((vendor / "package-lock.json").read_text("utf-8"))
    assert lock["packages"]["node_modules/htmx.org"]["version"] == "2.0.11"
    assert lock["packages"]["node_modules/uplot"]["version"] == "1.6.32"
    for licence in ("htmx.LICENSE", "uPlot.LICENSE"):
        assert "Permission" in (vendor / licence).read_text("utf-8")
