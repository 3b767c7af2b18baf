"""Ingestion from a real bridge over a private Mosquitto: once per message, and caught up
after the console's own outage."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, select
from sqlalchemy.exc import DataError

from devicebridge.cli import main
from devicebridge.cli.service import push_envelope
from devicebridge.clinic import schema as t
from devicebridge.clinic.auth import Accounts
from devicebridge.clinic.authoring import queue_pushes
from devicebridge.clinic.db import migrate, open_engine
from devicebridge.clinic.ingest import Incoming, IngestStore
from devicebridge.clinic.queries import Queries
from devicebridge.core.policy import default_policy
from devicebridge.core.signed_program import key_id, load_public_key, sign_program
from devicebridge.integrations.mqtt import MqttSettings
from tests.broker import Mosquitto
from tests.clinic.rig import (
    SHORT_ROUTINE,
    count,
    data_dir,
    ingesting,
    start_with_guided_massager,
    until,
)
from tests.clinic.web import massager_samples
from tests.service.conftest import WAIT_S, Therapist, service_rig


def assert_series_cover_the_contact(engine: Engine, session_id: int) -> None:
    """The kept telemetry of a session holds its contact time, give or take the message at
    each end that straddles the device's state changes (telemetry names no session)."""
    with engine.connect() as db:
        summary = json.loads(
            db.execute(
                select(t.sessions.c.summary).where(t.sessions.c.id == session_id)
            ).scalar_one()
        )
        rows = db.execute(
            select(t.session_series).where(t.session_series.c.session_id == session_id)
        ).all()
    kept_s = sum(r.contact_samples / r.sample_rate_hz for r in rows)
    assert summary["contact_s"] - 2.0 <= kept_s <= summary["contact_s"] + 2.0, (kept_s, summary)


async def test_a_program_session_is_ingested_once_and_caught_up_after_an_outage(
    mosquitto: Mosquitto, tmp_path: Path, engine: Engine
) -> None:
    therapist = Therapist()
    bridge_dir = data_dir(tmp_path)
    therapist.trust_on(bridge_dir)
    async with service_rig(bridge_dir, broker_port=mosquitto.port, massagers=0) as rig:
        async with ingesting(engine, mosquitto.port) as console:
            worker = await start_with_guided_massager(rig)
            ack = await push_envelope(
                MqttSettings("127.0.0.1", mosquitto.port),
                "bridge-7",
                therapist.sign(SHORT_ROUTINE.encode()),
                timeout_s=WAIT_S,
            )
            assert ack is not None
            assert ack["status"] == "accepted", ack
            await rig.wait(lambda: bool(rig.service.programs.programs()[0].installed_on))
            await rig.service.start_program(worker.serial, int(ack["program_id"]))
            await rig.wait(lambda: worker.runner is not None)
            await rig.wait(lambda: worker.runner is None)
            await until(lambda: count(engine, t.sessions, t.sessions.c.status != "running") == 1)
            await until(lambda: count(engine, t.programs, t.programs.c.installed_on != "[]") == 1)

        with engine.connect() as db:
            session = db.execute(select(t.sessions)).one()
            push = db.execute(select(t.pushes)).one()
            device = db.execute(select(t.devices)).one()
        assert session.status == "completed", session
        assert session.bridge_program_id == ack["program_id"]
        assert push.status == "accepted"
        assert push.routine == "Short firming"
        assert push.schedule_max_sessions == 2
        assert device.serial == worker.serial
        assert device.firmware
        assert_series_cover_the_contact(engine, session.id)
        stats = console.store.stats
        assert stats.skipped == 0, stats

        # The console is down while the bridge runs a second session: the broker keeps
        # what the bridge publishes for the console's persistent session.
        await rig.service.start_program(worker.serial, int(ack["program_id"]))
        await rig.wait(lambda: worker.runner is not None)
        await rig.wait(lambda: worker.runner is None)
        async with ingesting(engine, mosquitto.port):
            await until(lambda: count(engine, t.sessions, t.sessions.c.status == "completed") == 2)
            await rig.stop()
            await until(
                lambda: count(engine, t.clients, t.clients.c.availability == "offline") == 1
            )
    assert count(engine, t.sessions) == 2
    # The second session's telemetry waited at the broker too: it has its plot.
    with engine.connect() as db:
        second = db.execute(select(t.sessions.c.id).order_by(t.sessions.c.id.desc())).first()
    assert second is not None
    assert_series_cover_the_contact(engine, second.id)


async def test_every_message_applied_twice_changes_nothing(engine: Engine) -> None:
    store = IngestStore(engine)
    root = "devicebridge/v1/bridge-7"

    def message(topic: str, body: dict[str, object]) -> Incoming:
        return Incoming(f"{root}/{topic}", json.dumps(body).encode())

    summary = {
        "session_id": 4,
        "serial": "FM-1",
        "status": "stopped",
        "end_reason": "pressure cap",
        "program_id": 1,
        "started_at": "2026-12-01T10:00:00+00:00",
        "ended_at": "2026-12-01T10:05:00+00:00",
        "summary": {
            "routine": "Firming",
            "completion": 0.4,
            "cap_events": 2,
            "stopped_reason": "pressure above the cheek cap",
        },
    }
    batch = [
        Incoming(f"{root}/availability", b"online"),
        message(
            "status",
            {
                "message_id": "bridge-7:10",
                "version": "0.1.0",
                "state": "running",
                "outbox_depth": 0,
            },
        ),
        message(
            "devices/FM-1/state",
            {
                "message_id": "bridge-7:11",
                "serial": "FM-1",
                "kind": "massager",
                "firmware": "1.2.0",
                "state": "ready",
                "battery_percent": 80,
                "session_id": None,
            },
        ),
        message("sessions/summary", {"message_id": "bridge-7:12", **summary}),
        message(
            "programs/installed",
            {
                "message_id": "bridge-7:13",
                "programs": [
                    {
                        "program_id": 1,
                        "routine": "Firming",
                        "installed_on": ["FM-1"],
                        "pending_on": [],
                        "expires_at": "2026-12-30T00:00:00+00:00",
                    }
                ],
                "sessions": [{k: v for k, v in summary.items() if k != "end_reason"}],
            },
        ),
        message(
            "programs/ack",
            {
                "message_id": "bridge-7:14",
                "nonce": "n1",
                "status": "rejected",
                "reason": "unsafe",
                "detail": "too much",
            },
        ),
        message(
            "devices/FM-1/events",
            {"message_id": "bridge-7:15", "type": "device_event", "code": "fault"},
        ),
    ]
    store.apply(batch)
    tables = (t.clients, t.devices, t.sessions, t.programs, t.pushes, t.alerts)
    before = {table.name: count(engine, table) for table in tables}
    assert before == {
        "clients": 1,
        "devices": 1,
        "sessions": 1,
        "programs": 1,
        "pushes": 1,
        "alerts": 4,
    }, before
    # Re-delivered (QoS 1), and again from a console started afresh (no memory of ids).
    store.apply(batch)
    IngestStore(engine).apply(list(reversed(batch)))
    assert {table.name: count(engine, table) for table in tables} == before
    # An answer that came before its push (another connection): the envelope, seen later,
    # still gives the program and its schedule.
    signed = sign_program(
        Ed25519PrivateKey.generate(),
        SHORT_ROUTINE.encode(),
        therapist_id="dr-lee",
        client_id="bridge-7",
        program_version="1",
        issued_at=datetime.now(UTC),
        valid_for=timedelta(days=7),
    )
    nonce = signed.metadata.nonce
    store.apply(
        [
            message(
                "programs/ack",
                {
                    "message_id": "bridge-7:16",
                    "nonce": nonce,
                    "status": "accepted",
                    "program_id": 2,
                },
            ),
            Incoming(f"{root}/programs/push", signed.to_json()),
        ]
    )
    with engine.connect() as db:
        late = db.execute(select(t.pushes).where(t.pushes.c.nonce == nonce)).one()
    assert (late.status, late.bridge_program_id, late.schedule_max_sessions) == ("accepted", 2, 2)
    # An older retained state never overwrites a newer one.
    store.apply(
        [
            message(
                "devices/FM-1/state",
                {"message_id": "bridge-7:9", "serial": "FM-1", "battery_percent": 10},
            )
        ]
    )
    with engine.connect() as db:
        assert db.execute(select(t.devices.c.battery_percent)).scalar_one() == 80
    # What is not the contract is skipped and counted, never raised.
    store.apply(
        [
            Incoming(f"{root}/sessions/summary", b"{not json"),
            message("sessions/summary", {"message_id": "bridge-9:1", **summary}),
            message("devices/FM-1/telemetry", {"message_id": "bridge-7:30"}),
        ]
    )
    assert store.stats.skipped == 2


async def test_pushes_queued_by_the_console_go_out_and_their_answers_come_back(
    mosquitto: Mosquitto, tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVICEBRIDGE_KEY_DIR", str(tmp_path / "keys"))
    made = CliRunner().invoke(main, ["therapist", "keygen", "--id", "dr-lee"])
    assert made.exit_code == 0, made.output
    public_key = made.output.split("public key:")[1].split()[0]
    accounts = Accounts(engine)
    lee = accounts.create("lee", "a long enough password", therapist_id="dr-lee")
    Queries(engine).assign_by_name("bridge-7", "lee")
    with engine.connect() as db:
        client = db.execute(select(t.clients.c.id)).scalar_one()
    bridge_dir = data_dir(tmp_path)
    async with (
        service_rig(bridge_dir, broker_port=mosquitto.port, massagers=0) as rig,
        ingesting(engine, mosquitto.port) as console,
    ):
        await start_with_guided_massager(rig)

        def push() -> str:
            batch = queue_pushes(
                engine,
                user=lee,
                clients=[(client, "bridge-7")],
                program_text=SHORT_ROUTINE,
                policy=default_policy(),
            )
            console.ingester.push_queued()
            return batch

        def status(batch: str) -> tuple[str, str | None]:
            with engine.connect() as db:
                row = db.execute(
                    select(t.pushes.c.status, t.pushes.c.reason).where(t.pushes.c.batch == batch)
                ).one()
            return row.status, row.reason

        # The bridge does not trust dr-lee yet: rejected, and the therapist is told.
        first = push()
        await until(lambda: status(first)[0] == "rejected")
        assert status(first) == ("rejected", "unknown_key")
        assert count(engine, t.alerts, t.alerts.c.kind == "program_rejected") == 1
        # The client trusts the key; the next push is accepted and installed.
        rig.service.programs.trust(key_id(load_public_key(public_key)), "dr-lee", public_key)
        second = push()
        await until(lambda: status(second)[0] == "accepted")
        await until(lambda: count(engine, t.programs, t.programs.c.installed_on != "[]") == 1)
        await rig.stop()


def test_hostile_messages_are_skipped_and_the_rest_of_their_batch_still_counts(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IngestStore(engine)
    root = "devicebridge/v1/bridge-7"

    def message(topic: str, body: object) -> Incoming:
        return Incoming(f"{root}/{topic}", json.dumps(body).encode())

    good = {
        "message_id": "bridge-7:20",
        "session_id": 1,
        "serial": "FM-1",
        "status": "completed",
        "program_id": None,
        "started_at": "2026-12-01T10:00:00+01:00",
        "ended_at": "2026-12-01T10:05:00+01:00",
        "summary": {"completion": 1.0},
    }
    batch = [
        message("sessions/summary", {**good, "message_id": "bridge-7:10", "session_id": 2**70}),
        message(
            "sessions/summary",
            {
                **good,
                "message_id": "bridge-7:11",
                "session_id": 5,
                "routine": "nul\x00inside",
                "summary": ["not", "a", "map"],
            },
        ),
        message(
            "devices/FM-1/telemetry",
            {
                "message_id": "bridge-7:12",
                "serial": "FM-1",
                "sample_format": "massager_v1",
                "samples_b64": "!!not base64!!",
            },
        ),
        message(
            "devices/FM-1/state",
            {
                "message_id": "bridge-7:13",
                "battery_percent": 1e300,
                "session_id": -(2**80),
                "firmware": ["x"],
            },
        ),
        message(
            "programs/installed",
            {
                "message_id": "bridge-7:14",
                "programs": "nonsense",
                "sessions": [1, None, {"session_id": "x"}],
            },
        ),
        message("sessions/summary", {**good, "message_id": f"bridge-7:{2**64}"}),
        message("programs/ack", {"message_id": "bridge-7:15", "status": "maybe"}),
        Incoming(f"{root}/availability", b"\xff\xfe"),
        Incoming(f"{root}/sessions/summary", b"[1, 2]"),
        message("sessions/summary", good),
    ]
    store.apply(batch)
    # What only the database refuses (a number too large for its column) is skipped too,
    # and the rest of its batch still counts.
    state = {"serial": "FM-1", "kind": "massager", "state": "ready"}
    samples = base64.b64encode(massager_samples(10, "chin", 9.0).tobytes()).decode()
    telemetry = {
        "serial": "FM-1",
        "sample_format": "massager_v1",
        "sample_rate_hz": 100,
        "device_time_ms": 0,
        "count": 10,
        "samples_b64": samples,
        "gaps": [],
    }
    store.apply(
        [
            message("devices/FM-1/state", {"message_id": "bridge-7:30", **state, "session_id": 3}),
            message(
                "devices/FM-1/telemetry",
                {**telemetry, "message_id": "bridge-7:31", "first_sequence": 0, "count": 2**70},
            ),
            message(
                "devices/FM-1/events",
                {
                    "message_id": "bridge-7:32",
                    "type": "decision",
                    "session_id": 3,
                    "kind": "stop",
                    "message": "cap",
                    "step": 2**70,
                },
            ),
            message(
                "devices/FM-1/telemetry",
                {**telemetry, "message_id": "bridge-7:33", "first_sequence": 2**70},
            ),
            message(
                "devices/FM-1/telemetry",
                {**telemetry, "message_id": "bridge-7:34", "first_sequence": 10},
            ),
        ]
    )
    assert count(engine, t.session_series) == 2  # first_sequence 0 and 10
    # Whatever the database still refuses costs only that message, not its batch.
    # (The two states are written by one statement, which the database refuses whole.)
    real = IngestStore._store_devices

    def refuse_bad(self: IngestStore, db: Any, items: Any) -> int:
        if any(item.values["serial"] == "BAD" for item in items):
            raise DataError("INSERT ...", {}, Exception("value too long"))
        return real(self, db, items)

    monkeypatch.setattr(IngestStore, "_store_devices", refuse_bad)
    before = store.stats.skipped
    store.apply(
        [
            message("devices/BAD/state", {"message_id": "bridge-7:40", **state, "serial": "BAD"}),
            message("devices/FM-2/state", {"message_id": "bridge-7:41", **state, "serial": "FM-2"}),
            Incoming(f"{root}/devices/{'S' * 65}/state", b"{}"),
        ]
    )
    assert store.stats.skipped == before + 2
    with engine.connect() as db:
        assert sorted(db.execute(select(t.devices.c.serial)).scalars()) == ["FM-1", "FM-2"]
    with engine.connect() as db:
        sessions = {r.bridge_session_id: r for r in db.execute(select(t.sessions))}
        device = db.execute(select(t.devices).where(t.devices.c.serial == "FM-1")).one()
    # The good summary is in, its time in UTC; the one with a NUL is in without it.
    assert set(sessions) == {1, 3, 5}  # 3: seen running
    assert sessions[1].started_at.replace(tzinfo=None) == datetime(2026, 12, 1, 9, 0)
    assert sessions[5].routine == "nulinside"
    # 1e300 % and a session id of -2**80 were dropped (3 is from the later state).
    assert (device.battery_percent, device.session_id, device.firmware) == (None, 3, "['x']")
    assert store.stats.skipped >= 5
    assert store.stats.messages == len(batch) + 8  # every message counted once


def _random_messages(rng: random.Random, bridge: str, count_: int) -> list[Incoming]:
    """Messages of one bridge in a random order, sequence numbers repeated and out of order
    (re-deliveries, retained states), every kind the console keeps."""
    root = f"devicebridge/v1/{bridge}"
    samples = base64.b64encode(massager_samples(10, "chin", 9.0).tobytes()).decode()

    def session(session_id: int) -> dict[str, object]:
        status = rng.choice(["completed", "stopped", "refused", "running"])
        return {
            "session_id": session_id,
            "serial": "FM-1",
            "status": status,
            "end_reason": "pressure cap" if status == "stopped" else None,
            "program_id": 1,
            "started_at": f"2026-12-0{session_id}T10:00:00+00:00",
            "ended_at": f"2026-12-0{session_id}T10:05:00+00:00",
            "summary": {
                "routine": rng.choice(["Firming", "Drainage"]),
                "completion": rng.choice([0.4, 1.0]),
                "cap_events": rng.randint(0, 2),
                "refusals": [{"message": "over the daily limit"}],
            },
        }

    def body(kind: str) -> tuple[str, object]:
        if kind == "availability":
            return "availability", rng.choice(["online", "offline"])
        if kind == "status":
            return "status", {"version": "0.1.0", "state": rng.choice(["running", "stopped"])}
        if kind == "state":
            serial = rng.choice(["FM-1", "LM-1"])
            return f"devices/{serial}/state", {
                "serial": serial,
                "kind": "massager",
                "state": rng.choice(["ready", "running"]),
                "battery_percent": rng.randint(1, 100),
                "session_id": rng.choice([None, 1, 2, 3]),
            }
        if kind == "telemetry":
            return "devices/FM-1/telemetry", {
                "serial": "FM-1",
                "sample_format": "massager_v1",
                "sample_rate_hz": 100,
                "device_time_ms": 0,
                "first_sequence": 10 * rng.randint(0, 5),
                "count": 10,
                "samples_b64": samples,
                "gaps": [],
            }
        if kind == "event":
            return "devices/FM-1/events", rng.choice(
                [
                    {"type": "decision", "session_id": rng.randint(1, 4), "kind": "stop"},
                    {"type": "decision", "session_id": rng.randint(1, 4), "kind": "slow"},
                    {"type": "device_event", "code": "fault"},
                ]
            )
        if kind == "summary":
            return "sessions/summary", session(rng.randint(1, 4))
        if kind == "ack":
            return "programs/ack", {
                "nonce": rng.choice(["n1", "n2"]) + bridge,
                "status": rng.choice(["accepted", "rejected"]),
                "program_id": 1,
            }
        return "programs/installed", {
            "programs": [{"program_id": 1, "routine": "Firming", "installed_on": ["FM-1"]}],
            "sessions": [session(rng.randint(1, 4)) for _ in range(rng.randint(0, 3))],
        }

    kinds = ["availability", "status", "state", "telemetry", "event", "ack", "installed"]
    messages = []
    for _ in range(count_):
        # Summaries and device states come in runs, as a bridge back online sends them.
        kind = rng.choice([*kinds, "summary", "summary", "summary", "state"])
        topic, payload = body(kind)
        if isinstance(payload, dict):
            payload = {"message_id": f"{bridge}:{rng.randint(1, 40)}", **payload}
            data = json.dumps(payload).encode()
        else:
            data = str(payload).encode()
        messages.append(Incoming(f"{root}/{topic}", data))
    return messages


def _contents(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every ingested row, with the database's own ids replaced by the natural keys."""
    with engine.connect() as db:
        bridges = {row.id: row.bridge_id for row in db.execute(select(t.clients))}
        sessions = {
            row.id: (bridges[row.client_id], row.bridge_session_id)
            for row in db.execute(select(t.sessions))
        }
        contents = {}
        for table in (t.clients, t.devices, t.sessions, t.session_series, t.programs, t.pushes):
            rows = []
            for row in db.execute(select(table)).mappings():
                values = {k: v for k, v in row.items() if k != "id"}
                if "client_id" in values:
                    values["client_id"] = bridges[values["client_id"]]
                if table is t.session_series:
                    values["session_id"] = sessions[values["session_id"]]
                rows.append(tuple(sorted((k, repr(v)) for k, v in values.items())))
            contents[table.name] = sorted(rows)
        contents["alerts"] = sorted(
            (bridges[row.client_id], row.kind, row.ref, row.message, repr(row.raised_at))
            for row in db.execute(select(t.alerts))
        )
    return contents


BATCH_SIZE: Final = 20


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_applied_at_once_is_each_message_applied_alone(
    engine: Engine, database_url: str, tmp_path: Path, request: pytest.FixtureRequest, seed: int
) -> None:
    """Runs of summaries and device states are written one statement per run, and the
    statuses and availabilities once per batch: the database ends as if every message had
    been applied on its own, in order."""
    if engine.dialect.name == "sqlite":
        alone_url = str(tmp_path / "alone.sqlite3")
    else:
        alone_url = request.getfixturevalue("postgres").new_database()
    alone_engine = open_engine(alone_url)
    migrate(alone_engine)
    moment = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    try:
        rng = random.Random(seed)
        # Two bridges' messages, each in its order, mixed with each other's.
        first, second = (_random_messages(rng, bridge, 150) for bridge in ("bridge-a", "bridge-b"))
        messages = []
        while first or second:
            messages.append(
                (first if first and (not second or rng.random() < 0.5) else second).pop(0)
            )
        # The clock reads one second more per batch, for both stores: what a batch stamps
        # with "now" (last seen, availability) shows which batch wrote it.
        clock = [moment]
        together = IngestStore(engine, now=lambda: clock[0])
        alone = IngestStore(alone_engine, now=lambda: clock[0])
        for batch, start in enumerate(range(0, len(messages), BATCH_SIZE)):
            clock[0] = moment + timedelta(seconds=batch)
            together.apply(messages[start : start + BATCH_SIZE])
            for message in messages[start : start + BATCH_SIZE]:
                alone.apply([message])
        assert _contents(engine) == _contents(alone_engine)
        assert replace(together.stats, batches=0) == replace(alone.stats, batches=0)
        assert together.stats.applied > 100
        assert together.stats.duplicates > 20
    finally:
        alone_engine.dispose()
