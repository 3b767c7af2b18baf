"""A program started from the device's button runs through the same runner as any other:
recorded against its program when the bridge knows it and admission allows it, stopped
otherwise."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from devicebridge.core.policy import default_policy
from devicebridge.core.routine import parse_routine
from devicebridge.device import program_transfer
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore
from protocols import SampleFormat
from simulators import SimulatedMassager

from .conftest import Rig, Therapist, routine_text, service_rig
from .test_local_api import SHORT


async def installed(rig: Rig, text: bytes) -> int:
    therapist = Therapist()
    therapist.trust_on(rig.data_dir)
    await rig.start()
    worker = next(iter(rig.service.workers.values()))
    await rig.wait(lambda: worker.batcher is not None)
    ack = rig.service.handle_push(therapist.sign(text))
    assert ack["status"] == "accepted", ack
    program_id = int(ack["program_id"])

    def on_device() -> bool:
        program = next(p for p in rig.service.programs.programs() if p.id == program_id)
        return worker.serial in program.installed_on

    await rig.wait(on_device)
    return program_id


def massager_of(rig: Rig) -> SimulatedMassager:
    device = rig.devices[0]
    assert isinstance(device, SimulatedMassager)
    return device


async def test_a_known_program_started_on_the_device_is_recorded_against_it(
    tmp_path: Path,
) -> None:
    async with service_rig(tmp_path, guide_hands=True) as rig:
        program_id = await installed(rig, SHORT)
        worker = next(iter(rig.service.workers.values()))
        assert massager_of(rig).press_program_button()
        await rig.wait(lambda: worker.runner is not None)
        result = await worker.wait_routine()
    assert result is not None
    assert result.status == "completed", result
    assert result.summary["mode"] == "device"
    with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
        record = store.session(result.session_id or 0)
    assert record.program_id == str(program_id)


async def test_a_refused_or_unknown_program_started_on_the_device_is_stopped(
    tmp_path: Path,
) -> None:
    policy = default_policy()
    async with service_rig(tmp_path, guide_hands=True) as rig:
        await installed(rig, routine_text("firming"))
        for days_ago in (5.0, 1.0):  # two firming sessions this week: a third is refused
            with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
                past = store.start_session(
                    routine_name="earlier",
                    category="firming",
                    device_serial="PAST",
                    device_kind="massager",
                    sample_format=SampleFormat.MASSAGER_V1,
                    sample_rate_hz=100.0,
                    started_at=rig.service.now() - timedelta(days=days_ago),
                )
                store.finish_session(past, status="completed", end_reason=None, summary={})
        worker = next(iter(rig.service.workers.values()))
        massager = massager_of(rig)
        assert massager.press_program_button()
        await rig.wait(lambda: not massager.program_running)
        assert worker.runner is None

        # A program the bridge never stored (installed by another app, say): stopped too.
        routine = parse_routine(SHORT.decode(), policy)
        program = program_transfer.program_from_routine(routine, policy)
        await program_transfer.install_program(worker.session, program)
        assert massager.press_program_button()
        await rig.wait(lambda: not massager.program_running)
        assert worker.runner is None
    with SessionStore(tmp_path / SESSIONS_FILENAME) as store:
        statuses = [r.status for r in store.sessions() if r.device_serial != "PAST"]
    assert statuses == ["refused"]
