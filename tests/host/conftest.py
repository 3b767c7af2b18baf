"""Fixtures of the host tests: a simulated world on a fast virtual clock.

The host gets the world's VirtualClock as its Clock, so every wait (scan
windows, command timeouts, backoff) runs on virtual time; the clock's
background driver jumps from deadline to deadline, letting the event loop
(and pty I/O) run between jumps.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from devicebridge.core.reassembly import TelemetryGap, TelemetryItem
from devicebridge.device.session import DeviceSession, Subscription, session_class_for
from devicebridge.device.transport.ble import BleBackends, BleTransport, DiscoveredDevice
from protocols import TelemetryBatch
from simulators import SimulatedWorld, VirtualClock

SEED = 20250101
IN_PROCESS = "in-process"
LINK_LEVEL = "link-level"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test marked both_link_modes runs unchanged a second time with the devices
    # behind virtual Bluetooth controllers (simulators.linklevel, docs/qa.md).
    if metafunc.definition.get_closest_marker("both_link_modes") is not None:
        metafunc.parametrize("link_mode", [IN_PROCESS, LINK_LEVEL], indirect=True)


@pytest.fixture
def link_mode(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", IN_PROCESS))


@pytest.fixture
def clock(link_mode: str) -> VirtualClock:
    if link_mode == LINK_LEVEL:
        from simulators.linklevel import link_level_clock

        return link_level_clock()  # bumble runs on the wall clock: realtime, sped up
    return VirtualClock()


@pytest.fixture
async def world(clock: VirtualClock, link_mode: str) -> AsyncIterator[SimulatedWorld]:
    """An empty world; tests add devices before entering it with ``started_world``."""
    if link_mode == LINK_LEVEL:
        from simulators.linklevel import LinkLevelWorld

        yield LinkLevelWorld(seed=SEED, clock=clock)
    else:
        yield SimulatedWorld(seed=SEED, clock=clock)
    if clock.is_running:
        await clock.stop()


def backends(world: SimulatedWorld) -> BleBackends:
    return BleBackends(world.scanner_backend, world.client_backend)


def ble_session(
    world: SimulatedWorld, device: DiscoveredDevice, **options: object
) -> DeviceSession:
    cls = session_class_for(device.kind)
    transport = BleTransport(world.clock, device=device, backends=backends(world))
    return cls(transport, world.clock, rng=random.Random(SEED), name=device.name, **options)  # type: ignore[arg-type]


def drain(subscription: Subscription[TelemetryItem]) -> list[TelemetryItem]:
    """Everything queued in a subscription right now (no waiting)."""
    items: list[TelemetryItem] = []
    while subscription.pending():
        items.append(subscription._queue.get_nowait())  # type: ignore[arg-type]
    return items


def sequences(items: Sequence[TelemetryItem]) -> np.ndarray:
    """Every delivered sample's sequence number, in delivery order (gaps excluded)."""
    parts = [item.sequences for item in items if isinstance(item, TelemetryBatch)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def gaps(items: Sequence[TelemetryItem]) -> list[TelemetryGap]:
    return [item for item in items if isinstance(item, TelemetryGap)]
