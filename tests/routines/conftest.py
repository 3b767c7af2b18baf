"""Fixtures of the routine tests: the whole stack on a fast virtual clock.

simulator -> bleak backend -> BleTransport -> DeviceSession -> RoutineRunner -> engine ->
commands back to the simulated device; real SQLite files in tmp_path.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from devicebridge.core.policy import SafetyPolicy, default_policy
from devicebridge.core.routine import Routine, parse_routine
from devicebridge.device.session import DeviceSession, session_class_for
from devicebridge.device.transport.ble import BleBackends, BleTransport, find_device
from devicebridge.run.runner import RoutineRunner, RunMode
from devicebridge.storage.sessions import SessionStore
from protocols import Command, Opcode
from protocols.telemetry import MASSAGER_FLAG_MOTOR_ON
from simulators import SimulatedDevice, SimulatedWorld, VirtualClock
from tests.hooked_transport import HookedTransport, Write

SEED = 31337
NOW = datetime(2025, 3, 10, 9, 0, tzinfo=UTC)
RATE_HZ = 100


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
async def world(clock: VirtualClock) -> AsyncIterator[SimulatedWorld]:
    """An empty world; tests add devices, then enter it."""
    yield SimulatedWorld(seed=SEED, clock=clock)
    if clock.is_running:
        await clock.stop()


@pytest.fixture
def policy() -> SafetyPolicy:
    return default_policy()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SessionStore]:
    with SessionStore(tmp_path / "sessions.sqlite3") as opened:
        yield opened


class WriteLog:
    """Every command the host writes to the device: (virtual time, opcode)."""

    def __init__(self, session: DeviceSession, clock: VirtualClock) -> None:
        self.writes: list[tuple[float, Opcode | int]] = []

        async def log(data: bytes, write: Write) -> None:
            self.writes.append((clock.now_s(), Command.decode(data).opcode))
            await write(data)

        session.transport = HookedTransport(session.transport, control=log)

    def times_of(self, opcode: Opcode) -> list[float]:
        return [t for t, o in self.writes if o == opcode]


def routine_from(text: str, policy: SafetyPolicy) -> Routine:
    return parse_routine(text, policy, label="test.toml")


def massage_routine(steps: str, *, category: str = "test", name: str = "test routine") -> str:
    return f"""
[routine]
name = "{name}"
author = "tests"
version = "1"
device_kind = "massager"
category = "{category}"
{steps}
"""


def massage_step(
    zone: str, contact_time_s: float, low: float, high: float, *, intensity: int = 4
) -> str:
    return f"""
[[steps]]
zone = "{zone}"
contact_time_s = {contact_time_s}
mode = "vibration"
intensity = {intensity}
pressure_kpa = {{ min = {low}, max = {high} }}
"""


async def connect(world: SimulatedWorld, device: SimulatedDevice) -> DeviceSession:
    """A session to ``device`` over the real bleak API (not started)."""
    backends = BleBackends(world.scanner_backend, world.client_backend)
    found = await find_device(
        world.clock, lambda d: d.serial_number == device.serial_number, 5.0, backends.scanner
    )
    cls = session_class_for(found.kind)
    transport = BleTransport(world.clock, device=found, backends=backends)
    return cls(transport, world.clock, rng=random.Random(SEED), name=found.name)


def runner_for(
    session: DeviceSession,
    routine: Routine,
    policy: SafetyPolicy,
    store: SessionStore | None,
    *,
    now: datetime = NOW,
    mode: RunMode = RunMode.HOST,
) -> RoutineRunner:
    return RoutineRunner(session, routine, policy, store=store, now=lambda: now, mode=mode)


def motor_on(samples: np.ndarray) -> np.ndarray:
    return (samples["flags"] & MASSAGER_FLAG_MOTOR_ON) != 0
