"""``devicebridge clinic ...``: the therapists' web console (the optional 'clinic' extra).

The console's dependencies (Starlette, uvicorn, SQLAlchemy, ...) are imported inside
each command, after :func:`devicebridge.clinic.require_extra`, so that other commands
do not load them and a missing extra is one line naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click

from devicebridge.cli.base import CliContext, pass_cli, reports_errors, writable_data_dir

if TYPE_CHECKING:
    from sqlalchemy import Engine

DEFAULT_PORT: Final = 8765
PASSWORD_ENV: Final = "DEVICEBRIDGE_CLINIC_PASSWORD"

database_option = click.option(
    "--database",
    default=None,
    help="SQLite file or URL (postgresql://user@host/db). Default: clinic.sqlite3 in the "
    "data directory.",
)


def _database(cli: CliContext, database: str | None) -> str:
    if database:
        return database
    from devicebridge.clinic.db import DEFAULT_DATABASE_FILENAME

    return str(writable_data_dir(cli) / DEFAULT_DATABASE_FILENAME)


def _engine(cli: CliContext, database: str | None) -> Engine:
    from devicebridge.clinic import require_extra

    require_extra()
    from devicebridge.clinic.db import migrate, open_engine

    engine = open_engine(_database(cli, database))
    migrate(engine)
    return engine


@click.group("clinic")
def clinic_group() -> None:
    """The clinic console: therapists follow their clients' bridges in a browser."""


@clinic_group.command("serve")
@database_option
@click.option("--broker", default=None, help="MQTT broker HOST:PORT (default: the [mqtt] table).")
@click.option("--username", default=None, help="MQTT user name.")
@click.option(
    "--password", default=None, envvar="DEVICEBRIDGE_MQTT_PASSWORD", help="MQTT password."
)
@click.option(
    "--tls-ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="CA certificate: connect to the broker with TLS.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--console-id",
    default="console",
    show_default=True,
    help="Names this console's persistent MQTT session (devicebridge-clinic-ID).",
)
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--forwarded-allow-ips",
    default=None,
    help="Behind a TLS reverse proxy: the proxy's address(es), whose X-Forwarded-* are trusted.",
)
@click.option(
    "--insecure-cookies",
    is_flag=True,
    help="Cookies without Secure (plain HTTP on a non-loopback address; never in production).",
)
@pass_cli
@reports_errors
def serve_command(
    cli: CliContext,
    database: str | None,
    broker: str | None,
    username: str | None,
    password: str | None,
    tls_ca_file: Path | None,
    host: str,
    port: int,
    console_id: str,
    policy_file: Path | None,
    forwarded_allow_ips: str | None,
    insecure_cookies: bool,
) -> None:
    """Run the console: ingest from the broker and serve the web pages (Ctrl-C stops)."""
    from devicebridge.clinic import require_extra

    require_extra()
    from devicebridge.cli.routines import load_policy
    from devicebridge.cli.service import mqtt_settings
    from devicebridge.clinic.server import ServeOptions, serve

    settings = mqtt_settings(
        cli.settings.mqtt,
        broker,
        username=username,
        password=password,
        tls_ca_file=tls_ca_file,
    )
    if settings is None:
        raise click.UsageError("no MQTT broker: give --broker HOST:PORT or an [mqtt] table")
    options = ServeOptions(
        database=_database(cli, database),
        mqtt=settings,
        policy=load_policy(policy_file),
        host=host,
        port=port,
        console_id=console_id,
        secure_cookies=not insecure_cookies,
        forwarded_allow_ips=forwarded_allow_ips,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(options, announce=lambda line: click.echo(line, nl=True)))


@clinic_group.command("migrate")
@database_option
@pass_cli
@reports_errors
def migrate_command(cli: CliContext, database: str | None) -> None:
    """Create or upgrade the console's database schema."""
    from devicebridge.clinic.db import current_revision

    engine = _engine(cli, database)
    click.echo(f"database schema at revision {current_revision(engine)}")
    engine.dispose()


@clinic_group.group("user")
def user_group() -> None:
    """Console accounts (therapists and admins)."""


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    return str(click.prompt("password", hide_input=True, confirmation_prompt=True))


@user_group.command("add")
@click.argument("username")
@click.option("--therapist-id", default=None, help="Signs programs with this key (keygen --id).")
@click.option("--admin", is_flag=True, help="May assign clients and sees every client.")
@click.option(
    "--password-stdin",
    is_flag=True,
    help=f"Read the password from stdin ({PASSWORD_ENV} also works).",
)
@database_option
@pass_cli
@reports_errors
def user_add_command(
    cli: CliContext,
    username: str,
    therapist_id: str | None,
    admin: bool,
    password_stdin: bool,
    database: str | None,
) -> None:
    """Create an account."""
    engine = _engine(cli, database)
    from devicebridge.clinic.auth import Accounts

    try:
        Accounts(engine).create(
            username, _read_password(password_stdin), therapist_id=therapist_id, is_admin=admin
        )
    finally:
        engine.dispose()
    click.echo(f"created {'admin' if admin else 'user'} {username}")


@user_group.command("passwd")
@click.argument("username")
@click.option("--password-stdin", is_flag=True)
@database_option
@pass_cli
@reports_errors
def user_passwd_command(
    cli: CliContext, username: str, password_stdin: bool, database: str | None
) -> None:
    """Set a new password (and log the account out everywhere)."""
    engine = _engine(cli, database)
    from devicebridge.clinic.auth import Accounts

    try:
        Accounts(engine).set_password(username, _read_password(password_stdin))
    finally:
        engine.dispose()
    click.echo(f"password of {username} changed")


@user_group.command("disable")
@click.argument("username")
@database_option
@pass_cli
@reports_errors
def user_disable_command(cli: CliContext, username: str, database: str | None) -> None:
    """Disable an account (and log it out everywhere)."""
    engine = _engine(cli, database)
    from devicebridge.clinic.auth import Accounts

    try:
        Accounts(engine).set_disabled(username, True)
    finally:
        engine.dispose()
    click.echo(f"{username} disabled")


@user_group.command("list")
@database_option
@pass_cli
@reports_errors
def user_list_command(cli: CliContext, database: str | None) -> None:
    """The enabled accounts."""
    engine = _engine(cli, database)
    from devicebridge.clinic.auth import Accounts

    try:
        users = Accounts(engine).users()
    finally:
        engine.dispose()
    for user in users:
        role = "admin" if user.is_admin else "therapist"
        key = f", key {user.therapist_id}" if user.therapist_id else ""
        click.echo(f"{user.username} ({role}{key})")


@clinic_group.command("assign")
@click.argument("bridge_id")
@click.argument("username")
@click.option("--remove", is_flag=True, help="Unassign instead.")
@database_option
@pass_cli
@reports_errors
def assign_command(
    cli: CliContext, bridge_id: str, username: str, remove: bool, database: str | None
) -> None:
    """Assign the client BRIDGE_ID to USERNAME (the admin page does the same)."""
    engine = _engine(cli, database)
    from devicebridge.clinic.queries import Queries

    try:
        Queries(engine).assign_by_name(bridge_id, username, assigned=not remove)
    finally:
        engine.dispose()
    click.echo(f"{bridge_id} {'no longer ' if remove else ''}assigned to {username}")
