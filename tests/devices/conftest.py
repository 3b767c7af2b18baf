"""Fixtures of the device-family tests: simulated devices of every catalogued family, reached
through the real bleak API (the simulator's backend), on a fast virtual clock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devicebridge.core.catalogue import DeviceCatalogue, default_catalogue
from devicebridge.core.policy import SafetyPolicy, default_policy
from devicebridge.core.routine import Routine, parse_routine
from devicebridge.device.session import DeviceSession, MassagerSession, session_class_for
from devicebridge.device.transport.ble import BleBackends, BleTransport, find_device
from devicebridge.device.transport.foreo import ForeoTransport
from devicebridge.run.runner import RoutineRunner
from devicebridge.storage.sessions import SessionStore
from simulators import SimulatedWorld, VirtualClock
from simulators.devices.foreo import SimulatedForeo

SEED = 4242
NOW = datetime(2025, 6, 2, 8, 30, tzinfo=UTC)


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
def catalogue() -> DeviceCatalogue:
    return default_catalogue()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SessionStore]:
    with SessionStore(tmp_path / "sessions.sqlite3") as opened:
        yield opened


@dataclass(frozen=True, slots=True)
class GattWrite:
    """One write a simulated device received, as bleak carried it."""

    at_s: float
    characteristic: str
    data: bytes
    with_response: bool


def recording_backends(world: SimulatedWorld, writes: list[GattWrite]) -> BleBackends:
    """The world's bleak backends, with every GATT write the host makes logged."""
    base: Any = world.client_backend

    class Recording(base):  # type: ignore[misc,valid-type]
        async def write_gatt_char(self, characteristic: Any, data: Any, response: bool) -> None:
            writes.append(
                GattWrite(world.clock.now_s(), characteristic.uuid, bytes(data), response)
            )
            await super().write_gatt_char(characteristic, data, response)

    return BleBackends(world.scanner_backend, Recording)


async def foreo_session(
    world: SimulatedWorld,
    device: SimulatedForeo,
    catalogue: DeviceCatalogue,
    backends: BleBackends | None = None,
) -> MassagerSession:
    """A session to a simulated FOREO over the real bleak API (not started)."""
    backends = backends or BleBackends(world.scanner_backend, world.client_backend)
    found = await find_device(
        world.clock, lambda d: d.address == device.address, 5.0, backends.scanner
    )
    family = catalogue.family("foreo")
    assert family is not None
    transport = ForeoTransport(world.clock, family, device=found, backends=backends)
    return MassagerSession(transport, world.clock, rng=random.Random(SEED), name=found.name)


async def ofcp_session(
    world: SimulatedWorld, serial_number: str, backends: BleBackends
) -> DeviceSession:
    found = await find_device(
        world.clock, lambda d: d.serial_number == serial_number, 5.0, backends.scanner
    )
    transport = BleTransport(world.clock, device=found, backends=backends)
    cls = session_class_for(found.kind)
    return cls(transport, world.clock, rng=random.Random(SEED), name=found.name)


def timed_routine(policy: SafetyPolicy, steps: str, *, name: str = "foreo test") -> Routine:
    text = f"""
[routine]
name = "{name}"
author = "tests"
version = "1"
device_kind = "massager"
category = "general"
{steps}
"""
    return parse_routine(text, policy, label="timed.toml")


def timed_step(zone: str, duration_s: float, intensity: int) -> str:
    return f"""
[[steps]]
zone = "{zone}"
timing = "time"
duration_s = {duration_s}
intensity = {intensity}
"""


def runner(
    session: DeviceSession,
    routine: Routine,
    policy: SafetyPolicy,
    store: SessionStore | None,
    **options: Any,
) -> RoutineRunner:
    return RoutineRunner(session, routine, policy, store=store, now=lambda: NOW, **options)
