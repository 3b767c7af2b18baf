"""A client runs the programs its therapist pushed, through the running bridge's local API:
the same runner and guidance, recorded against the program and counted for adherence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from devicebridge.errors import LocalApiError
from devicebridge.run.view import RunnerState
from devicebridge.service import local_api
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore

from .conftest import WAIT_S, Rig, Therapist, routine_text, service_rig

SHORT = b"""
[routine]
name = "Short cheek"
author = "dr-lee"
version = "2"
device_kind = "massager"
category = "drainage"

[[steps]]
zone = "cheek_left"
contact_time_s = 6
mode = "vibration"
intensity = 4
pressure_kpa = { min = 4.0, max = 12.0 }
"""


async def pushed_program(rig: Rig, text: bytes) -> int:
    therapist = Therapist()
    therapist.trust_on(rig.data_dir)
    ack = rig.service.handle_push(therapist.sign(text))
    assert ack["status"] == "accepted", ack
    return int(ack["program_id"])


async def started(rig: Rig) -> str:
    await rig.start()
    worker = next(iter(rig.service.workers.values()))
    await rig.wait(lambda: worker.batcher is not None)
    return worker.paired.name


async def test_a_pushed_program_runs_through_the_bridge_and_counts_for_adherence(
    tmp_path: Path,
) -> None:
    async with service_rig(tmp_path, guide_hands=True) as rig:
        device = await started(rig)
        program_id = await pushed_program(rig, SHORT)
        states: list[RunnerState] = []
        connection = await local_api.connect(tmp_path)
        assert connection is not None
        async with asyncio.timeout(WAIT_S):
            result = await local_api.run_on_bridge(
                connection,
                {"device": device, "program_id": program_id},
                on_state=states.append,
            )
        adherence = rig.service.adherence()
    assert result.status == "completed", result
    assert result.summary["routine"] == "Short cheek"
    assert states
    assert states[-1].finished
    assert any(s.pressure_kpa for s in states)
    (session,) = adherence["sessions"]
    assert (session["program_id"], session["session_id"]) == (program_id, result.session_id)
    assert session["status"] == "completed"
    with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
        assert store.session(result.session_id or 0).program_id == str(program_id)


async def test_a_refusal_and_a_bad_request_are_answered_and_the_bridge_goes_on(
    tmp_path: Path,
) -> None:
    async with service_rig(tmp_path, guide_hands=True) as rig:
        device = await started(rig)
        connection = await local_api.connect(tmp_path)
        assert connection is not None
        with pytest.raises(LocalApiError, match="no served device named 'nobody'"):
            await local_api.run_on_bridge(
                connection, {"device": "nobody", "routine_text": SHORT.decode(), "label": "x"}
            )
        for garbage in (b"[[[[\n", b"\xff\xfe\n", b'{"op": "format c:"}\n'):
            reader, writer = await asyncio.open_unix_connection(
                str(local_api.socket_path(tmp_path))
            )
            writer.write(garbage)
            answer = await reader.readline()
            writer.close()
            assert b'"event":"error"' in answer
        connection = await local_api.connect(tmp_path)
        assert connection is not None
        firming = routine_text("firming").decode().replace("{ min = 4.0, max = 12.0 }", "{}", 1)
        with pytest.raises(LocalApiError, match="not a valid routine"):
            await local_api.run_on_bridge(
                connection, {"device": device, "routine_text": firming, "label": "firming"}
            )
        # Still serving: a good request runs.
        connection = await local_api.connect(tmp_path)
        assert connection is not None
        async with asyncio.timeout(WAIT_S):
            result = await local_api.run_on_bridge(
                connection, {"device": device, "routine_text": SHORT.decode(), "label": "ok"}
            )
    assert result.status == "completed"


async def test_hanging_up_stops_the_routine_and_keeps_its_record(tmp_path: Path) -> None:
    async with service_rig(tmp_path, guide_hands=True) as rig:
        device = await started(rig)
        connection = await local_api.connect(tmp_path)
        assert connection is not None
        first_state = asyncio.Event()
        follow = asyncio.create_task(
            local_api.run_on_bridge(
                connection,
                {"device": device, "routine_text": routine_text("firming").decode(), "label": "f"},
                on_state=lambda _: first_state.set(),
            )
        )
        async with asyncio.timeout(WAIT_S):
            await first_state.wait()
        follow.cancel()  # Ctrl-C in `devicebridge run`
        worker = next(iter(rig.service.workers.values()))
        async with asyncio.timeout(WAIT_S):
            result = await worker.wait_routine()
    assert result is not None
    assert (result.status, result.end_reason) == ("stopped", "stopped by the user")
    with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
        assert store.session(result.session_id or 0).status == "stopped"
