"""`devicebridge serve` killed (SIGKILL) during a session, then started again."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import numpy as np

from devicebridge.integrations.mqtt import Topics
from devicebridge.service.status import status_file
from devicebridge.storage.outbox import OUTBOX_FILENAME, Outbox
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore
from tests.broker import Mosquitto
from tests.service.conftest import (
    BRIDGE,
    ROUTINES,
    WAIT_S,
    Rig,
    Subscriber,
    running,
    service_rig,
)

TOPICS = Topics(BRIDGE)
SERVE = "from devicebridge.cli import main; main()"


def write_config(path: Path, port: int) -> None:
    path.write_text(
        "simulate = true\nsim_massagers = 1\nsim_masks = 0\n"
        f'bridge_id = "{BRIDGE}"\n\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
    )


async def serve(tmp_path: Path, *extra: str) -> asyncio.subprocess.Process:
    # The simulated devices run in real time here, so the session is surely still running
    # when the test decides to kill the bridge.
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVE,
        "--config",
        str(tmp_path / "config.toml"),
        "--data-dir",
        str(tmp_path / "data"),
        "serve",
        *extra,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_for_recording(data_dir: Path, samples: int) -> int:
    """The running session's id once it has stored ``samples`` samples (polls the files)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            # The status file appears once the service has created (migrated) its stores.
            if status_file(data_dir).exists():
                with SessionStore(data_dir / SESSIONS_FILENAME) as store:
                    running_ = [r for r in store.sessions() if r.status == "running"]
                    if running_ and len(store.telemetry(running_[0].id)[0]) >= samples:
                        return running_[0].id
            await asyncio.sleep(0.05)  # polling another process's files


async def test_a_killed_bridge_keeps_its_session_and_its_outbox_resumes(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    write_config(tmp_path / "config.toml", mosquitto.port)
    mosquitto.stop()  # everything the bridge publishes waits in its outbox
    process = await serve(tmp_path, "--run", str(ROUTINES / "firming.toml"))
    try:
        session_id = await wait_for_recording(data_dir, samples=250)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    assert process.returncode == -signal.SIGKILL

    outbox = Outbox(data_dir / OUTBOX_FILENAME, bridge_id=BRIDGE)
    waiting = [m for m in outbox.pending(10_000) if m.topic.endswith("/telemetry")]
    outbox.close()
    assert len(waiting) >= 2

    mosquitto.start()
    subscriber = Subscriber(mosquitto.port, TOPICS.telemetry("+"), TOPICS.session_summaries)
    async with running(subscriber.run()):
        async with asyncio.timeout(WAIT_S):
            await subscriber.subscribed.wait()
        async with service_rig(data_dir, broker_port=mosquitto.port, with_devices=False) as rig:
            await rig.start()
            assert rig.service.recovered_sessions == [session_id]
            await rig.wait(lambda: len(subscriber.on("/telemetry")) >= len(waiting))
            await rig.wait(lambda: bool(subscriber.on("/sessions/summary")))
            # Everything the killed bridge left in the outbox has left it (the new bridge
            # goes on adding its status every ten virtual seconds, which fly by here).
            last_left = max(sequence_of(m.message_id) for m in waiting)
            await rig.wait(lambda: oldest_waiting(rig) > last_left)
            await rig.stop()

    telemetry = subscriber.on("/telemetry")
    assert [b["message_id"] for b in telemetry[: len(waiting)]] == [m.message_id for m in waiting]
    firsts = [b["first_sequence"] for b in telemetry]
    assert firsts == sorted(firsts)
    (summary,) = subscriber.on("/sessions/summary")
    assert (summary["session_id"], summary["status"]) == (session_id, "interrupted")
    # What it recorded, summed up as a finished run would be (not an empty summary).
    recorded = summary["summary"]
    assert recorded["samples"] >= 250
    assert recorded["routine"] == "Firming: cheeks, jawline, chin"
    assert recorded["steps_total"] == 5
    assert recorded["contact_s"] > 0

    with SessionStore(data_dir / SESSIONS_FILENAME) as store:
        record = store.session(session_id)
        assert record.status == "interrupted"
        sequences, samples = store.telemetry(session_id)
        assert len(sequences) >= 250
        # Intact: every sample from the first to the last stored, once, in order.
        assert np.array_equal(sequences, np.arange(sequences[0], sequences[0] + len(sequences)))
        assert len(samples) == len(sequences)


async def test_sigterm_stops_the_served_devices_and_closes_the_records(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (tmp_path / "config.toml").write_text(
        f'simulate = true\nsim_massagers = 1\nsim_masks = 0\nbridge_id = "{BRIDGE}"\n'
    )
    process = await serve(tmp_path, "--run", str(ROUTINES / "firming.toml"), "--log-json")
    try:
        session_id = await wait_for_recording(data_dir, samples=100)
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert b'"message": "bridge bridge-7 stopped"' in stderr
    with SessionStore(data_dir / SESSIONS_FILENAME) as store:
        record = store.session(session_id)
        assert (record.status, record.end_reason) == ("stopped", "bridge stopped")


def sequence_of(message_id: str) -> int:
    return int(message_id.rsplit(":", 1)[1])


def oldest_waiting(rig: Rig) -> float:
    """The sequence of the oldest message still in the outbox (infinite when empty)."""
    outbox = rig.service.outbox
    assert outbox is not None
    pending = outbox.pending(1)
    return sequence_of(pending[0].message_id) if pending else float("inf")
