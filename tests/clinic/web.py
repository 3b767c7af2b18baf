"""The console's web app in-process (Starlette's TestClient over HTTPS) with test data."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from devicebridge.clinic import schema as t
from devicebridge.clinic.app import ConsoleConfig, create_app
from devicebridge.clinic.auth import Accounts
from devicebridge.clinic.ingest import Incoming, IngestStore
from devicebridge.clinic.queries import Queries
from devicebridge.core.engine import ZONE_CODES
from devicebridge.core.policy import default_policy
from devicebridge.core.signed_program import sign_program
from protocols.telemetry import MASSAGER_FLAG_CONTACT, MASSAGER_SAMPLE_DTYPE

BASE_URL = "https://console.test"
PASSWORD = "correct horse battery"
ROOT = "devicebridge/v1"


def message(bridge: str, topic: str, body: dict[str, Any]) -> Incoming:
    return Incoming(f"{ROOT}/{bridge}/{topic}", json.dumps(body).encode())


FIRMING = (
    Path(__file__).resolve().parents[2] / "devicebridge" / "data" / "routines" / "firming.toml"
).read_text("utf-8")


def massager_samples(count: int, zone: str, pressure_kpa: float) -> np.ndarray[Any, Any]:
    samples = np.zeros(count, dtype=MASSAGER_SAMPLE_DTYPE)
    samples["pressure_dapa"] = round(pressure_kpa * 100)
    samples["skin_temperature_centi_c"] = 3150
    samples["battery_percent"] = 80
    samples["zone"] = ZONE_CODES[zone]
    samples["intensity"] = 5
    samples["flags"] = MASSAGER_FLAG_CONTACT
    return samples


def telemetry(bridge: str, mid: str, first_sequence: int, zone: str, kpa: float) -> Incoming:
    samples = massager_samples(100, zone, kpa)
    return message(
        bridge,
        "devices/FM-1A/telemetry",
        {
            "message_id": mid,
            "serial": "FM-1A",
            "sample_format": "massager_v1",
            "sample_rate_hz": 100,
            "first_sequence": first_sequence,
            "device_time_ms": first_sequence * 10,
            "count": 100,
            "samples_b64": base64.b64encode(samples.tobytes()).decode(),
            "gaps": [],
        },
    )


def bridge_messages(bridge: str, *, sessions: int = 2, first_seq: int = 1) -> list[Incoming]:
    """What a bridge with one massager and one program publishes, ``sessions`` run."""
    seq = iter(range(first_seq, first_seq + 1000))

    def mid() -> str:
        return f"{bridge}:{next(seq)}"

    # The program, pushed (with the CLI, say) and accepted before the console's records begin.
    signed = sign_program(
        Ed25519PrivateKey.generate(),
        FIRMING.encode(),
        therapist_id="dr-a",
        client_id=bridge,
        program_version="3",
        issued_at=datetime(2026, 11, 30, 8, 0, tzinfo=UTC),
        valid_for=timedelta(days=60),
    )
    out = [
        Incoming(f"{ROOT}/{bridge}/programs/push", signed.to_json()),
        message(
            bridge,
            "programs/ack",
            {
                "message_id": mid(),
                "nonce": signed.metadata.nonce,
                "status": "accepted",
                "program_id": 1,
                "routine": "Firming",
                "program_version": "3",
                "device_kind": "massager",
            },
        ),
        Incoming(f"{ROOT}/{bridge}/availability", b"online"),
        message(
            bridge,
            "status",
            {"message_id": mid(), "version": "0.1.0", "state": "running", "outbox_depth": 0},
        ),
        message(
            bridge,
            "devices/FM-1A/state",
            {
                "message_id": mid(),
                "serial": "FM-1A",
                "name": "face",
                "kind": "massager",
                "model": "FM-2",
                "firmware": "1.4.2",
                "state": "ready",
                "battery_percent": 76,
                "session_id": None,
                "updated_at": "2026-12-01T09:00:00+00:00",
            },
        ),
    ]
    # Session 1 is watched live: its device state names it, then 2 s on the left cheek at
    # 8 kPa and 1 s on the right at 10 kPa, then the device is free again.
    state = {
        "serial": "FM-1A",
        "name": "face",
        "kind": "massager",
        "model": "FM-2",
        "firmware": "1.4.2",
        "state": "ready",
        "battery_percent": 76,
    }
    out.append(
        message(bridge, "devices/FM-1A/state", {"message_id": mid(), **state, "session_id": 1})
    )
    out.append(telemetry(bridge, mid(), 1000, "cheek_left", 8.0))
    out.append(telemetry(bridge, mid(), 1100, "cheek_left", 8.0))
    out.append(telemetry(bridge, mid(), 1200, "cheek_right", 10.0))
    out.append(
        message(bridge, "devices/FM-1A/state", {"message_id": mid(), **state, "session_id": None})
    )
    summaries = []
    for n in range(1, sessions + 1):
        body = {
            "session_id": n,
            "serial": "FM-1A",
            "status": "completed",
            "end_reason": None,
            "program_id": 1,
            "started_at": f"2026-12-0{n}T10:00:00+00:00",
            "ended_at": f"2026-12-0{n}T10:05:00+00:00",
            "summary": {
                "routine": "Firming",
                "completion": 1.0,
                "contact_s": 285.0,
                "time_in_band_s": 250.0,
                "in_band_fraction": 0.877,
                "out_of_band_events": 1,
                "cap_events": 0,
                "steps_done": 5,
                "steps_total": 5,
            },
        }
        summaries.append(body)
        out.append(message(bridge, "sessions/summary", {"message_id": mid(), **body}))
    out.append(
        message(
            bridge,
            "programs/installed",
            {
                "message_id": mid(),
                "programs": [
                    {
                        "program_id": 1,
                        "therapist_id": "dr-a",
                        "key_id": "k",
                        "program_version": "3",
                        "routine": "Firming",
                        "device_kind": "massager",
                        "received_at": "2026-11-30T08:00:00+00:00",
                        "expires_at": "2099-01-01T00:00:00+00:00",
                        "installed_on": ["FM-1A"],
                        "pending_on": [],
                    }
                ],
                "sessions": summaries,
            },
        )
    )
    return out


@dataclass
class Web:
    engine: Engine
    client: TestClient
    ids: dict[str, int] = field(default_factory=dict)  # bridge id -> console client id

    def login(self, username: str, password: str = PASSWORD) -> str:
        """Log in; return the CSRF token of the new session."""
        form = self.client.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        assert token is not None
        response = self.client.post(
            "/login",
            data={"username": username, "password": password, "login_token": token.group(1)},
            follow_redirects=False,
        )
        assert response.status_code == 303, response.text
        home = self.client.get("/")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', home.text)
        assert csrf is not None
        return csrf.group(1)

    def session_id(self, bridge: str, bridge_session_id: int) -> int:
        with self.engine.connect() as db:
            return int(
                db.execute(
                    select(t.sessions.c.id).where(
                        t.sessions.c.client_id == self.ids[bridge],
                        t.sessions.c.bridge_session_id == bridge_session_id,
                    )
                ).scalar_one()
            )


def make_web(engine: Engine, **config: Any) -> Iterator[Web]:
    accounts = Accounts(engine)
    accounts.create("admin", PASSWORD, is_admin=True)
    accounts.create("dr-a", PASSWORD, therapist_id="dr-a")
    accounts.create("dr-b", PASSWORD, therapist_id="dr-b")
    store = IngestStore(engine)
    store.apply(bridge_messages("bridge-a") + bridge_messages("bridge-b"))
    queries = Queries(engine)
    queries.assign_by_name("bridge-a", "dr-a")
    queries.assign_by_name("bridge-b", "dr-b")
    app = create_app(ConsoleConfig(engine=engine, policy=default_policy(), **config))
    with TestClient(app, base_url=BASE_URL) as client:
        web = Web(engine, client)
        with engine.connect() as db:
            web.ids = {r.bridge_id: r.id for r in db.execute(select(t.clients))}
        yield web
