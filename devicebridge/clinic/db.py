"""Opening the console's database: SQLite by default, PostgreSQL for a clinic.

``--database`` takes a file path (SQLite) or a URL (``postgresql://user@host/db``,
``sqlite:///path``). The schema is brought up to date by Alembic at start
(:func:`migrate`); a database newer than this console is refused with a clear error.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from devicebridge.clinic.errors import DatabaseError

LOG = logging.getLogger(__name__)
DEFAULT_DATABASE_FILENAME: Final = "clinic.sqlite3"
SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
POOL_SIZE: Final = 8


def database_url(text: str | Path) -> URL:
    """A SQLAlchemy URL for a path or a URL (``postgresql://`` uses psycopg 3)."""
    value = str(text)
    if "://" not in value:
        return URL.create("sqlite", database=str(Path(value).expanduser()))
    try:
        url = make_url(value)
    except ArgumentError as exc:
        raise DatabaseError(f"not a database URL: {value!r}") from exc
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseError(
            f"unsupported database {url.get_backend_name()!r}: use SQLite or PostgreSQL"
        )
    return url


def open_engine(target: str | Path | URL) -> Engine:
    url = target if isinstance(target, URL) else database_url(target)
    options: dict[str, Any] = {"future": True}
    if url.get_backend_name() == "postgresql":
        options |= {"pool_size": POOL_SIZE, "pool_pre_ping": True}
    else:
        if url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        options |= {"pool_size": POOL_SIZE}
    try:
        engine = create_engine(url, **options)
    except (SQLAlchemyError, ImportError) as exc:
        raise DatabaseError(
            f"cannot open {url.render_as_string(hide_password=True)}: {exc}"
        ) from exc
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: pages are read while the ingester writes; foreign keys are off by default.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    location = resources.files("devicebridge.clinic") / "migrations"
    config.set_main_option("script_location", str(location))
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: Engine) -> str:
    """Bring the schema to this console's head revision; return it."""
    from alembic import command
    from alembic.script import ScriptDirectory

    config = _alembic_config()
    known = {s.revision for s in ScriptDirectory.from_config(config).walk_revisions()}
    try:
        current = current_revision(engine)
        if current is not None and current not in known:
            raise DatabaseError(
                f"the database is at schema revision {current}, which this console does not "
                "know: it was written by a newer devicebridge"
            )
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise DatabaseError(f"migrating the database failed: {exc}") from exc
    head = head_revision()
    if current != head:
        LOG.info("database schema at %s (was %s)", head, current or "empty")
    return head


def table_names(engine: Engine) -> list[str]:
    return sorted(inspect(engine).get_table_names())
