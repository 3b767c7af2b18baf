"""Who sees what: a therapist sees and pushes only to their own clients, by page, by API and
by guessing ids; forged and cross-site requests are refused; passwords are hashed."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from devicebridge.cli import main
from devicebridge.clinic import schema as t
from devicebridge.core.signed_program import (
    TrustedSigner,
    load_public_key,
    parse_envelope,
    verify,
)
from tests.clinic.rig import count
from tests.clinic.web import BASE_URL, PASSWORD, Web

PROGRAM = (
    "[routine]\nname = 'Tiny'\nauthor = 't'\nversion = '1'\ndevice_kind = 'massager'\n"
    "[[steps]]\nzone = 'cheek_left'\ncontact_time_s = 5\nintensity = 3\n"
    "pressure_kpa = { min = 4.0, max = 10.0 }\n"
)


def test_a_therapist_sees_only_assigned_clients_by_page_api_and_guessed_ids(web: Web) -> None:
    web.login("dr-a")
    own, other = web.ids["bridge-a"], web.ids["bridge-b"]
    own_session, other_session = web.session_id("bridge-a", 1), web.session_id("bridge-b", 1)

    home = web.client.get("/")
    assert "bridge-a" in home.text
    assert "bridge-b" not in home.text
    assert [c["bridge_id"] for c in web.client.get("/api/clients").json()["clients"]] == [
        "bridge-a"
    ]
    assert web.client.get(f"/clients/{own}").status_code == 200
    assert web.client.get(f"/clients/{own}/sessions/{own_session}").status_code == 200

    forbidden = [
        f"/clients/{other}",
        f"/clients/{other}/live",
        f"/api/clients/{other}",
        f"/clients/{other}/sessions/{other_session}",
        f"/api/clients/{other}/sessions/{other_session}",
        f"/clients/{other}/fhir",
        f"/clients/{other}/sessions/{other_session}/fhir",
        f"/clients/{other}/sessions.csv",
        # B's session under A's client id: the session is checked against the client too.
        f"/clients/{own}/sessions/{other_session}",
        f"/api/clients/{own}/sessions/{other_session}",
        "/admin",
    ]
    for path in forbidden:
        response = web.client.get(path)
        assert response.status_code == 404, path
        assert "bridge-b" not in response.text, path
    # Guessing: every other id looks exactly like one that does not exist.
    for guess in range(1, 40):
        status = web.client.get(f"/api/clients/{guess}").status_code
        assert status == (200 if guess == own else 404), guess


def keygen(monkeypatch: pytest.MonkeyPatch, key_dir: Path, therapist_id: str) -> str:
    """A therapist key made by `devicebridge therapist keygen`; returns the public key."""
    monkeypatch.setenv("DEVICEBRIDGE_KEY_DIR", str(key_dir))
    result = CliRunner().invoke(main, ["therapist", "keygen", "--id", therapist_id])
    assert result.exit_code == 0, result.output
    return result.output.split("public key:")[1].split()[0]


def test_a_therapist_cannot_push_to_or_acknowledge_for_another_therapists_client(
    web: Web, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public_key = keygen(monkeypatch, tmp_path / "keys", "dr-a")
    csrf = web.login("dr-a")
    own, other = web.ids["bridge-a"], web.ids["bridge-b"]
    headers = {"X-CSRF-Token": csrf, "Accept": "application/json"}

    for clients in ([other], [own, other]):
        response = web.client.post(
            "/programs/push", data={"program": PROGRAM, "client": clients}, headers=headers
        )
        assert response.status_code == 404, clients
    assert count(web.engine, t.pushes, t.pushes.c.pushed_by.is_not(None)) == 0

    with web.engine.begin() as db:
        alert = db.execute(
            t.alerts.insert()
            .values(
                client_id=other,
                kind="device_fault",
                ref="message:99",
                message="fault",
                raised_at=datetime.now(UTC),
            )
            .returning(t.alerts.c.id)
        ).scalar_one()
    for path in (
        f"/clients/{other}/alerts/{alert}/acknowledge",
        f"/clients/{own}/alerts/{alert}/acknowledge",
    ):
        assert web.client.post(path, headers=headers).status_code == 404
    assert count(web.engine, t.alerts, t.alerts.c.acknowledged_at.is_not(None)) == 0

    # To their own client: signed here with dr-a's key, bound to that bridge, queued.
    response = web.client.post(
        "/programs/push", data={"program": PROGRAM, "client": [own]}, headers=headers
    )
    assert response.status_code == 201, response.text
    with web.engine.connect() as db:
        push = db.execute(select(t.pushes).where(t.pushes.c.pushed_by.is_not(None))).one()
    signed = parse_envelope(push.envelope.encode())
    meta = verify(
        signed,
        trusted_keys={signed.key_id: TrustedSigner("dr-a", load_public_key(public_key))},
        bridge_id="bridge-a",
        now=datetime.now(UTC),
        nonce_seen=lambda _nonce: False,
    )
    assert (meta.metadata.therapist_id, push.status, push.client_id) == ("dr-a", "queued", own)
    # The page that follows the push shows nothing of the key.
    page = web.client.get(f"/pushes/{push.batch}")
    assert "PRIVATE KEY" not in page.text
    assert web.client.get(f"/pushes/{push.batch}").status_code == 200
    web.client.cookies.clear()
    web.login("dr-b")
    assert web.client.get(f"/pushes/{push.batch}").status_code == 404


def test_forged_and_cross_site_requests_are_refused(web: Web) -> None:
    csrf = web.login("dr-a")
    own = web.ids["bridge-a"]
    data = {"program": PROGRAM}
    assert web.client.post("/programs/validate", data=data).status_code == 403
    assert (
        web.client.post("/programs/validate", data={**data, "csrf_token": "guess"}).status_code
        == 403
    )
    assert (
        web.client.post(
            "/programs/validate", data=data, headers={"X-CSRF-Token": csrf[:-1] + "x"}
        ).status_code
        == 403
    )
    cross_site = [
        {"X-CSRF-Token": csrf, "Origin": "https://evil.example"},
        {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"},
        {"X-CSRF-Token": csrf, "Origin": "null"},
    ]
    for headers in cross_site:
        assert web.client.post("/programs/validate", data=data, headers=headers).status_code == 403
    good = web.client.post(
        "/programs/validate", data=data, headers={"X-CSRF-Token": csrf, "Origin": BASE_URL}
    )
    assert good.status_code == 200
    assert "Valid" in good.text
    # A form posted from another site with the token in it (a stolen page) is still refused.
    assert (
        web.client.post(
            "/logout", data={"csrf_token": csrf}, headers={"Origin": "https://evil.example"}
        ).status_code
        == 403
    )
    assert web.client.get(f"/clients/{own}").status_code == 200  # still logged in
    # Login itself: only with the form's own token, only same-site.
    web.client.cookies.clear()
    assert (
        web.client.post(
            "/login", data={"username": "dr-a", "password": PASSWORD, "login_token": "x"}
        ).status_code
        == 403
    )


def test_without_a_login_nothing_is_shown(web: Web) -> None:
    response = web.client.get("/", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert web.client.get("/api/clients").status_code == 401
    assert (
        web.client.get(f"/clients/{web.ids['bridge-a']}", follow_redirects=False).status_code == 303
    )
    assert web.client.post("/programs/push", data={"program": PROGRAM}).status_code == 401
    wrong = web.client.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', wrong.text)
    assert token is not None
    refused = web.client.post(
        "/login", data={"username": "dr-a", "password": "not it", "login_token": token.group(1)}
    )
    assert refused.status_code == 401
    assert "wrong user name or password" in refused.text


def test_cookies_are_secure_and_passwords_hashed(web: Web) -> None:
    form = web.client.get("/login")
    assert "Secure" in form.headers["set-cookie"]
    token = re.search(r'name="login_token" value="([^"]+)"', form.text)
    assert token is not None
    response = web.client.post(
        "/login",
        data={"username": "dr-a", "password": PASSWORD, "login_token": token.group(1)},
        follow_redirects=False,
    )
    cookie = next(
        c
        for c in response.headers.get_list("set-cookie")
        if c.startswith("__Host-devicebridge-session=")
    )
    for attribute in ("Secure", "HttpOnly", "SameSite=strict", "Path=/"):
        assert attribute.lower() in cookie.lower(), cookie
    assert "domain" not in cookie.lower()
    page = web.client.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    with web.engine.connect() as db:
        hashes = db.execute(select(t.users.c.password_hash)).scalars().all()
        tokens = db.execute(select(t.web_sessions.c.token_hash)).scalars().all()
    assert all(h.startswith("$argon2id$") and PASSWORD not in h for h in hashes)
    session_cookie = cookie.split(";")[0].split("=", 1)[1]
    assert session_cookie not in tokens  # only its hash is stored
    # Logging out ends the session on the server, not only in the browser.
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf is not None
    web.client.post("/logout", data={"csrf_token": csrf.group(1)})
    web.client.cookies.set("__Host-devicebridge-session", session_cookie)
    assert web.client.get("/api/clients").status_code == 401


def test_an_admin_assigns_clients_and_the_therapist_then_sees_them(web: Web) -> None:
    csrf = web.login("admin")
    assert web.client.get("/admin").status_code == 200
    with web.engine.connect() as db:
        dr_a = db.execute(select(t.users.c.id).where(t.users.c.username == "dr-a")).scalar_one()
    response = web.client.post(
        "/admin/assign",
        data={
            "client_id": web.ids["bridge-b"],
            "user_id": dr_a,
            "assigned": "1",
            "csrf_token": csrf,
        },
        follow_redirects=False,
    )
    assert response.status_code == 303
    web.client.cookies.clear()
    csrf = web.login("dr-a")
    assert web.client.get(f"/api/clients/{web.ids['bridge-b']}").status_code == 200
    # A therapist cannot assign (the admin pages do not exist for them).
    assert (
        web.client.post(
            "/admin/assign",
            data={
                "client_id": web.ids["bridge-b"],
                "user_id": dr_a,
                "assigned": "0",
                "csrf_token": csrf,
            },
        ).status_code
        == 404
    )


def test_repeated_wrong_passwords_lock_that_login_for_a_while(web: Web) -> None:
    def attempt(password: str) -> int:
        form = web.client.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        assert token is not None
        return web.client.post(
            "/login",
            data={"username": "dr-a", "password": password, "login_token": token.group(1)},
            follow_redirects=False,
        ).status_code

    assert [attempt("wrong guess") for _ in range(5)] == [401] * 5
    # Even the right password is refused now, without being checked.
    assert attempt(PASSWORD) == 429
    # Another account is not affected.
    form = web.client.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', form.text)
    assert token is not None
    assert (
        web.client.post(
            "/login",
            data={"username": "dr-b", "password": PASSWORD, "login_token": token.group(1)},
            follow_redirects=False,
        ).status_code
        == 303
    )
