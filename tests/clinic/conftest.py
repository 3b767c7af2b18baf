"""Fixtures of the console's tests: its database on SQLite and on a private PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the clinic console needs: pip install -e '.[clinic]'")

from sqlalchemy import Engine

from devicebridge.clinic.db import migrate, open_engine
from tests.clinic.postgres import PostgresCluster, postgres_cluster
from tests.clinic.web import Web, make_web


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the private cluster."""
    if request.param == "sqlite":
        return str(tmp_path / "clinic.sqlite3")
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.new_database()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The console's database, migrated to the current schema."""
    engine = open_engine(database_url)
    migrate(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def web(engine: Engine) -> Iterator[Web]:
    """The app with an admin, two therapists (dr-a follows bridge-a, dr-b bridge-b)."""
    yield from make_web(engine)
