"""Fixtures of the link-level tests: simulated devices behind virtual controllers (bumble).

The world runs on a realtime VirtualClock sped up ten times (bumble keeps wall
time; see simulators/linklevel/world.py). Tests wait on the virtual clock or on
events; the real-time timeouts below are hang safety nets only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import pytest

from simulators import VirtualClock
from simulators.linklevel import LinkLevelWorld, link_level_clock

SEED = 4242
HANG_SAFETY_S = 10.0  # wall seconds; never reached when things work

T = TypeVar("T")


@pytest.fixture
def clock() -> VirtualClock:
    return link_level_clock()


@pytest.fixture
async def world(clock: VirtualClock) -> AsyncIterator[LinkLevelWorld]:
    """An empty link-level world; tests add devices, then enter it."""
    yield LinkLevelWorld(seed=SEED, clock=clock)
    if clock.is_running:
        await clock.stop()


async def within_safety(awaitable: Awaitable[T]) -> T:
    """Await with a wall-clock hang safety net."""
    return await asyncio.wait_for(awaitable, HANG_SAFETY_S)
