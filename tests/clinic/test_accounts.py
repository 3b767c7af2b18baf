"""Accounts: the first admin through the one-time setup address, and the CLI's user commands."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from devicebridge.cli import main
from devicebridge.clinic import schema as t
from devicebridge.clinic.app import ConsoleConfig, create_app
from devicebridge.core.policy import default_policy
from tests.clinic.web import BASE_URL

PASSWORD = "a long enough password"


def login(client: TestClient, username: str, password: str) -> int:
    token = re.search(r'name="login_token" value="([^"]+)"', client.get("/login").text)
    assert token is not None
    return client.post(
        "/login",
        data={"username": username, "password": password, "login_token": token[1]},
        follow_redirects=False,
    ).status_code


def test_the_first_admin_is_made_once_with_the_printed_token(engine: Engine) -> None:
    config = ConsoleConfig(engine=engine, policy=default_policy(), setup_token="s3cret-token")
    with TestClient(create_app(config), base_url=BASE_URL) as client:
        assert client.get("/setup?token=guess").status_code == 404
        page = client.get("/setup?token=s3cret-token")
        assert page.status_code == 200
        short = client.post(
            "/setup",
            data={"token": "s3cret-token", "username": "admin", "password": "short"},
        )
        assert short.status_code == 400
        assert "at least 10 characters" in short.text
        made = client.post(
            "/setup",
            data={"token": "s3cret-token", "username": "admin", "password": PASSWORD},
            follow_redirects=False,
        )
        assert made.status_code == 303
        # Once an account exists, the address is gone.
        assert client.get("/setup?token=s3cret-token").status_code == 404
        assert login(client, "admin", PASSWORD) == 303
        assert client.get("/admin").status_code == 200


def test_user_commands_create_change_list_and_disable_accounts(tmp_path: Path) -> None:
    database = ["--database", str(tmp_path / "c.sqlite3")]
    runner = CliRunner(env={"DEVICEBRIDGE_CLINIC_PASSWORD": PASSWORD})

    def cli(*args: str, stdin: str | None = None) -> str:
        result = runner.invoke(main, [*args, *database], input=stdin)
        assert result.exit_code == 0, result.output
        return result.output

    cli("clinic", "user", "add", "dr-lee", "--therapist-id", "dr-lee")
    cli("clinic", "user", "add", "boss", "--admin")
    assert cli("clinic", "user", "list").splitlines() == [
        "boss (admin)",
        "dr-lee (therapist, key dr-lee)",
    ]
    twice = runner.invoke(main, ["clinic", "user", "add", "boss", *database])
    assert twice.exit_code == 1
    assert "exists already" in twice.output
    cli("clinic", "user", "passwd", "dr-lee", "--password-stdin", stdin="another long one\n")
    cli("clinic", "assign", "bridge-7", "dr-lee")
    from devicebridge.clinic.db import open_engine

    engine = open_engine(tmp_path / "c.sqlite3")
    try:
        config = ConsoleConfig(engine=engine, policy=default_policy())
        with TestClient(create_app(config), base_url=BASE_URL) as client:
            assert login(client, "dr-lee", PASSWORD) == 401
            assert login(client, "dr-lee", "another long one") == 303
            assert [c["bridge_id"] for c in client.get("/api/clients").json()["clients"]] == [
                "bridge-7"
            ]
            cli("clinic", "user", "disable", "dr-lee")
            # Disabling ends the sessions it had.
            assert client.get("/api/clients").status_code == 401
        with engine.connect() as db:
            assert db.execute(
                select(t.users.c.disabled).where(t.users.c.username == "dr-lee")
            ).scalar_one()
    finally:
        engine.dispose()
