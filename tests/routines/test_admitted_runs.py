"""Admission counts a run from the moment it is admitted, not from the moment its session is
stored: runs sharing one store writer (every run of ``devicebridge serve``) count each other
while they connect, and a run that ends before it is stored stops counting."""

from __future__ import annotations

from pathlib import Path

import pytest

from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.routine import Routine
from devicebridge.device.session import DeviceSession
from devicebridge.errors import RoutineRefusedError
from devicebridge.run.runner import RoutineRunner
from devicebridge.storage.sessions import SessionStore
from devicebridge.storage.writer import StoreWriter
from simulators import SimulatedWorld, VirtualClock

from .conftest import NOW, connect, routine_from

FIRMING_FILE = Path(__file__).resolve().parents[2] / "devicebridge/data/routines/firming.toml"

RED_30_J = """
[routine]
name = "red, 30 J/cm2"
author = "tests"
version = "1"
device_kind = "led_mask"
category = "general"

[[steps]]
red_mw_cm2 = 50.0
duration_s = 600
"""


def runners(
    session: DeviceSession,
    routine: Routine,
    policy: SafetyPolicy,
    store: SessionStore,
    writer: StoreWriter,
    count: int = 3,
) -> list[RoutineRunner]:
    """``count`` runs of ``routine`` sharing one store writer, as in ``devicebridge serve``."""
    return [
        RoutineRunner(session, routine, policy, store=store, writer=writer, now=lambda: NOW)
        for _ in range(count)
    ]


async def test_a_third_firming_admitted_before_two_are_stored_is_refused_until_one_is_released(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    routine = routine_from(FIRMING_FILE.read_text(), policy)
    writer = StoreWriter(store)
    massager = world.add_massager()
    async with world:
        clock.start()
        session = await connect(world, massager)
        first, second, third, fourth = runners(session, routine, policy, store, writer, 4)
        assert (await first.admit()).allowed
        assert (await second.admit()).allowed
        with pytest.raises(RoutineRefusedError) as refused:
            await third.admit()
        assert "2 'firming' sessions count" in str(refused.value)
        assert "frequency.firming.max_sessions = 2" in str(refused.value)
        # The first ends before its session is stored (its device went, say): it no longer
        # counts, and a new start is admitted in its place.
        first.release_admission()
        assert (await fourth.admit()).allowed
    writer.close()
    # Refused attempts are stored (history shows them); admitted ones not yet.
    assert [record.status for record in store.sessions()] == ["refused"]


async def test_light_admitted_but_not_stored_counts_its_planned_dose_toward_the_day(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    routine = routine_from(RED_30_J, policy)  # 50 mW/cm2 x 600 s = 30 J/cm2 of 60 a day
    writer = StoreWriter(store)
    mask = world.add_mask()
    async with world:
        clock.start()
        first, second, third = runners(await connect(world, mask), routine, policy, store, writer)
        assert (await first.admit()).allowed
        admission = await second.admit()
        assert admission.allowed
        assert admission.dose_today_j_cm2["red"] == pytest.approx(30.0)
        with pytest.raises(RoutineRefusedError) as refused:
            await third.admit()
        already = "red light: 60.0 J/cm² already in the last 24 h plus 30.0 planned"
        assert already in str(refused.value)
    writer.close()
