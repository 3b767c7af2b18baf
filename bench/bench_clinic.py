"""The clinic console at clinic scale: 5,000 bridges into one console, on SQLite and PostgreSQL.

A publisher process plays 5,000 bridges on a private Mosquitto: each publishes what a
bridge publishes over a month of use, retained and not (availability, two statuses, the
state of its massager and its LED mask, eight session summaries of a twice-a-week program,
the acknowledgement of that program and the retained ``programs/installed`` with its
sessions), with the bridge's message ids. The console has opened its persistent session
before and is offline while they publish (the broker queues for it); then it connects and
ingests the backlog plus the retained messages its new subscription brings: the rate
measures what ingestion sustains. The baseline, in the same run, is a subscriber that
drains the same backlog with the same manual acknowledgement and only parses the JSON (the
broker's and the client library's share of the cost).

Then, with every client assigned to one therapist, the 95th percentile time of the client
list page (the first page of 5,000 clients, those needing attention first) and of one
client's page (random clients), in-process through the ASGI app; and the database bytes
per client-month: the growth of the database over the month of messages above, divided by
the clients, and the same with the telemetry digests the console keeps of eight 15-minute
sessions (measured on a few sessions and scaled).

Targets (issue 12): ingestion at least 4 x 500 messages/s (what 5,000 bridges publish at
steady state, a status every 10 s each); both pages under 200 ms at the 95th percentile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

from bench.report import print_table

BRIDGES: Final = 5000
SESSIONS_PER_MONTH: Final = 8  # a twice-a-week program
TELEMETRY_SESSIONS: Final = 6  # sessions whose telemetry digests are measured
SESSION_MESSAGES: Final = 900  # a 15-minute session: one telemetry message per second
PAGE_REQUESTS: Final = 60
TARGET_MESSAGES_PER_S: Final = 4 * 500
TARGET_PAGE_P95_S: Final = 0.200
WAIT_S: Final = 600.0  # a hang net for the whole ingestion
RETAINED_PER_BRIDGE: Final = 5  # availability, status, two device states, programs/installed

PUBLISHER = r"""
import json, sys
from datetime import datetime, timedelta, timezone
import paho.mqtt.client as mqtt

port, bridges, sessions = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bridges",
                     protocol=mqtt.MQTTv5)
client.max_inflight_messages_set(1000)
client.connect("127.0.0.1", port)
client.loop_start()
start = datetime(2026, 11, 1, 18, 0, tzinfo=timezone.utc)
count, last = 0, None
for b in range(bridges):
    bridge = f"bridge-{b:05d}"
    seq = 0
    def publish(topic, body=None, retain=False, raw=None):
        global count, last, seq
        if body is not None:
            seq += 1
            body = {"message_id": f"{bridge}:{seq}", **body}
        payload = raw if raw is not None else json.dumps(body, separators=(",", ":"))
        last = client.publish(f"devicebridge/v1/{bridge}/{topic}", payload, qos=1, retain=retain)
        count += 1
        if count % 500 == 0:
            last.wait_for_publish(timeout=60)  # keeps paho's queue short
    publish("availability", raw=b"online", retain=True)
    for state in ("running", "running"):
        publish("status", {"bridge_id": bridge, "version": "0.1.0", "state": state, "pid": 4242,
                           "outbox_depth": 0, "devices": []}, retain=True)
    devices = ((f"FM{b:05d}", "massager", "FM-2"), (f"LM{b:05d}", "led_mask", "LM-1"))
    for serial, kind, model in devices:
        publish(f"devices/{serial}/state", {"serial": serial, "name": kind, "kind": kind,
                "model": model, "firmware": "1.4.2", "state": "ready", "battery_percent": 80,
                "session_id": None, "updated_at": start.isoformat()}, retain=True)
    publish("programs/ack", {"nonce": f"{b:032x}", "status": "accepted", "program_id": 1,
                             "routine": "Firming: cheeks, jawline, chin", "program_version": "3",
                             "device_kind": "massager"})
    summaries = []
    for n in range(1, sessions + 1):
        begun = start + timedelta(days=3.5 * (n - 1))
        ok = n % 5 != 0  # every fifth session ends on the cap (an alert)
        body = {"session_id": n, "serial": f"FM{b:05d}", "status": "completed" if ok else "stopped",
                "end_reason": None if ok else "pressure cap", "program_id": 1,
                "started_at": begun.isoformat(),
                "ended_at": (begun + timedelta(minutes=5)).isoformat(),
                "summary": {"routine": "Firming: cheeks, jawline, chin", "routine_version": "1.0",
                            "samples": 28500, "lost_samples": 0, "completion": 1.0 if ok else 0.6,
                            "steps_done": 5 if ok else 3, "steps_total": 5, "contact_s": 285.0,
                            "time_in_band_s": 251.3, "in_band_fraction": 0.8818,
                            "out_of_band_events": 2, "cap_events": 0 if ok else 3,
                            "stopped_reason": None if ok else "pressure cap"}}
        summaries.append(body)
        publish("sessions/summary", body)
    publish("programs/installed", {"bridge_id": bridge, "programs": [{
        "program_id": 1, "therapist_id": "dr-lee", "key_id": "1c0ffee0d15ea5e5",
        "program_version": "3", "routine": "Firming: cheeks, jawline, chin",
        "device_kind": "massager", "received_at": start.isoformat(),
        "expires_at": (start + timedelta(days=60)).isoformat(),
        "installed_on": [f"FM{b:05d}"], "pending_on": []}],
        "sessions": summaries, "updated_at": start.isoformat()}, retain=True)
last.wait_for_publish(timeout=600)
client.loop_stop()
client.disconnect()
print(count, flush=True)
"""

DRAIN = r"""
import json, sys, time
import paho.mqtt.client as mqtt

port, expected = int(sys.argv[1]), int(sys.argv[2])
seen = 0
first = None
def on_message(client, userdata, message):
    global seen, first
    if first is None:
        first = time.perf_counter()
    if message.payload[:1] == b"{":
        json.loads(message.payload)
    seen += 1
    client.ack(message.mid, message.qos)
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-baseline",
                     protocol=mqtt.MQTTv5, manual_ack=True)
client.on_message = on_message
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
properties = Properties(PacketTypes.CONNECT)
properties.SessionExpiryInterval = 3600
client.connect("127.0.0.1", port, clean_start=False, properties=properties)
if sys.argv[3] == "subscribe":
    client.subscribe("devicebridge/v1/+/#", qos=1)
    client.loop(1.0)
    client.disconnect()
    print("subscribed", flush=True)
    sys.exit(0)
started = time.perf_counter()
while seen < expected and time.perf_counter() - started < 600:
    client.loop(0.05)
print(json.dumps({"messages": seen, "seconds": time.perf_counter() - first}), flush=True)
"""


class Broker:
    """A private Mosquitto that queues enough for an offline console."""

    def __init__(self, workdir: Path) -> None:
        from tests.broker import free_port, mosquitto_binary

        self.binary = mosquitto_binary()
        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 1000000\nmax_inflight_messages 1000\n"
        )
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary,
            "-c",
            str(self.config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.02)  # readiness polling
        raise RuntimeError("mosquitto did not start")

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await self.process.wait()


async def _python(script: str, *args: object) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *(str(a) for a in args), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"helper process failed ({process.returncode})")
    return out.decode().strip()


@contextlib.asynccontextmanager
async def _ingester(engine: Any, port: int) -> AsyncIterator[Any]:
    from devicebridge.clinic.ingest import Ingester, IngestSettings, IngestStore
    from devicebridge.integrations.mqtt import MqttSettings

    store = IngestStore(engine)
    ingester = Ingester(store, IngestSettings(MqttSettings("127.0.0.1", port), "bench"))
    task = asyncio.create_task(ingester.run())
    try:
        async with asyncio.timeout(30):
            await ingester.connected.wait()
        yield store
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _used_bytes(engine: Any) -> int:
    """Bytes the console's tables take (SQLite: used pages; PostgreSQL: their relations)."""
    from sqlalchemy import text

    from devicebridge.clinic.schema import metadata

    with engine.connect() as db:
        if engine.dialect.name == "postgresql":
            db.execute(text("CHECKPOINT"))
            return sum(
                int(db.execute(text(f"SELECT pg_total_relation_size('{name}')")).scalar_one())
                for name in metadata.tables
            )
        db.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        pages = int(db.execute(text("PRAGMA page_count")).scalar_one())
        free = int(db.execute(text("PRAGMA freelist_count")).scalar_one())
        size = int(db.execute(text("PRAGMA page_size")).scalar_one())
        return (pages - free) * size


def _telemetry_bytes_per_session(engine: Any) -> float:
    """What the digests of one 15-minute massage session add to the database."""
    import base64

    import numpy as np

    from devicebridge.clinic.ingest import Incoming, IngestStore
    from devicebridge.core.engine import ZONE_CODES
    from protocols.telemetry import MASSAGER_FLAG_CONTACT, MASSAGER_SAMPLE_DTYPE

    store = IngestStore(engine)
    rng = np.random.default_rng(7)
    zones = ["cheek_left", "cheek_right", "jawline_left", "jawline_right", "chin"]
    before = _used_bytes(engine)
    for session in range(1, TELEMETRY_SESSIONS + 1):
        bridge = f"bridge-tele-{session}"
        root = f"devicebridge/v1/{bridge}"
        numbers = iter(range(1, SESSION_MESSAGES + 2))

        def mid(bridge: str = bridge, numbers: Iterator[int] = numbers) -> str:
            return f"{bridge}:{next(numbers)}"

        state = {"serial": "FM1", "kind": "massager", "state": "ready"}
        batch = [
            Incoming(
                f"{root}/devices/FM1/state",
                json.dumps({"message_id": mid(), **state, "session_id": 1}).encode(),
            )
        ]
        for second in range(SESSION_MESSAGES):
            samples = np.zeros(100, dtype=MASSAGER_SAMPLE_DTYPE)
            samples["pressure_dapa"] = rng.normal(900, 150, 100).clip(0, 4000)
            samples["skin_temperature_centi_c"] = 3150
            samples["zone"] = ZONE_CODES[zones[second * len(zones) // SESSION_MESSAGES]]
            samples["flags"] = MASSAGER_FLAG_CONTACT
            body = {
                "message_id": mid(),
                "serial": "FM1",
                "sample_format": "massager_v1",
                "sample_rate_hz": 100,
                "first_sequence": second * 100,
                "device_time_ms": second * 1000,
                "count": 100,
                "samples_b64": base64.b64encode(samples.tobytes()).decode(),
                "gaps": [],
            }
            batch.append(Incoming(f"{root}/devices/FM1/telemetry", json.dumps(body).encode()))
        store.apply(batch)
    return (_used_bytes(engine) - before) / TELEMETRY_SESSIONS


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _page_times(engine: Any) -> tuple[float, float]:
    """p95 wall time (s) of the client list and of one client's page, in-process."""
    from sqlalchemy import insert, select
    from starlette.testclient import TestClient

    from devicebridge.clinic import schema as t
    from devicebridge.clinic.app import ConsoleConfig, create_app
    from devicebridge.clinic.auth import Accounts
    from devicebridge.core.policy import default_policy

    password = "bench password 123"
    user = Accounts(engine).create("bench", password, therapist_id="bench")
    with engine.begin() as db:
        ids = [int(r[0]) for r in db.execute(select(t.clients.c.id))]
        db.execute(insert(t.assignments), [{"user_id": user.id, "client_id": i} for i in ids])
    app = create_app(ConsoleConfig(engine=engine, policy=default_policy()))
    rng = random.Random(3)
    with TestClient(app, base_url="https://bench.test") as client:
        form = client.get("/login").text
        token = re.search(r'name="login_token" value="([^"]+)"', form)
        assert token is not None
        client.post(
            "/login", data={"username": "bench", "password": password, "login_token": token[1]}
        )

        def timed(path: str) -> float:
            started = time.perf_counter()
            response = client.get(path)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"{path}: {response.status_code}")
            return elapsed

        timed("/")  # warm the template cache and the connection pool
        lists = [timed("/") for _ in range(PAGE_REQUESTS)]
        pages = [timed(f"/clients/{rng.choice(ids)}") for _ in range(PAGE_REQUESTS)]
    return _percentile(lists, 0.95), _percentile(pages, 0.95)


async def _one_database(name: str, url: str, workdir: Path) -> dict[str, Any]:
    from devicebridge.clinic.db import migrate, open_engine

    broker = Broker(workdir)
    await broker.start()
    engine = open_engine(url)
    try:
        migrate(engine)
        empty = _used_bytes(engine)
        # Both subscribers open their persistent sessions, then go away.
        async with _ingester(engine, broker.port):
            pass
        await _python(DRAIN, broker.port, 0, "subscribe")
        published = int(await _python(PUBLISHER, broker.port, BRIDGES, SESSIONS_PER_MONTH))
        baseline = json.loads(await _python(DRAIN, broker.port, published, "drain"))
        expected = published + BRIDGES * RETAINED_PER_BRIDGE
        async with _ingester(engine, broker.port) as store:
            started = time.perf_counter()
            async with asyncio.timeout(WAIT_S):
                while store.stats.messages < expected:  # noqa: ASYNC110 - the ingester runs
                    await asyncio.sleep(0.05)  # polling a counter
            seconds = time.perf_counter() - started
        stats = store.stats
        month = _used_bytes(engine) - empty
        per_session = await asyncio.to_thread(_telemetry_bytes_per_session, engine)
        list_p95, client_p95 = await asyncio.to_thread(_page_times, engine)
    finally:
        engine.dispose()
        await broker.stop()
    return {
        "name": name,
        "messages": stats.messages,
        "skipped": stats.skipped,
        "seconds": seconds,
        "rate": stats.messages / seconds,
        "baseline_rate": baseline["messages"] / baseline["seconds"],
        "list_p95": list_p95,
        "client_p95": client_p95,
        "bytes_month": month / BRIDGES,
        "bytes_month_telemetry": month / BRIDGES + SESSIONS_PER_MONTH * per_session,
    }


async def _all() -> list[dict[str, Any]]:
    from tests.clinic.postgres import postgres_cluster

    results = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-clinic-"))
    try:
        results.append(await _one_database("SQLite", str(workdir / "clinic.sqlite3"), workdir))
        with postgres_cluster() as cluster:
            results.append(await _one_database("PostgreSQL", cluster.new_database(), workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def run() -> bool:
    try:
        from devicebridge.clinic import require_extra

        require_extra()
    except Exception as exc:  # a missing extra is reported, not raised
        print(f"clinic bench: {exc}")
        return False
    results = asyncio.run(_all())
    ok = True
    rows: list[list[object]] = []
    for r in results:
        met = (
            r["rate"] >= TARGET_MESSAGES_PER_S
            and r["list_p95"] <= TARGET_PAGE_P95_S
            and r["client_p95"] <= TARGET_PAGE_P95_S
            and r["skipped"] == 0
        )
        ok &= met
        rows.append(
            [
                r["name"],
                r["messages"],
                r["rate"],
                r["baseline_rate"],
                f"{r['rate'] / TARGET_MESSAGES_PER_S * 4:.1f} x 500",
                f"{r['list_p95'] * 1000:.0f} ms",
                f"{r['client_p95'] * 1000:.0f} ms",
                f"{r['bytes_month'] / 1024:.1f} KiB",
                f"{r['bytes_month_telemetry'] / 1024:.0f} KiB",
                "met" if met else "MISSED",
            ]
        )
    print_table(
        f"clinic: {BRIDGES:,} bridges' month of state, status, adherence and session summaries "
        "into one console (backlog after an outage + retained); baseline = a subscriber that "
        "only parses; pages in-process, p95 of "
        f"{PAGE_REQUESTS} requests; bytes per client-month without / with the telemetry "
        f"digests of {SESSIONS_PER_MONTH} 15-minute sessions",
        [
            "database",
            "messages",
            "ingested/s",
            "baseline/s",
            "vs steady state",
            "client list p95",
            "client page p95",
            "bytes/client-month",
            "with telemetry",
            "targets",
        ],
        rows,
    )
    return ok


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
