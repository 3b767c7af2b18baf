"""The clock helpers, the error tree, and session behaviour around link loss."""

from __future__ import annotations

import asyncio
import itertools
import socket

import pytest

import devicebridge.errors as errors_module
from devicebridge.clock import Clock, SystemClock, background_turn, wait_for
from devicebridge.core.states import ConnectionState
from devicebridge.device.session import MassagerSession
from devicebridge.device.transport.ble import find_device
from devicebridge.errors import ConnectionLostError, DeviceBridgeError, NotConnectedError
from protocols import Ping
from simulators import SimulatedWorld, VirtualClock

from .conftest import ble_session


async def test_wait_for_times_out_on_virtual_time(clock: VirtualClock) -> None:
    assert isinstance(clock, Clock)
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    clock.start()
    with pytest.raises(TimeoutError):
        await wait_for(clock, never, 30.0)
    assert clock.now_s() == pytest.approx(30.0)
    assert never.cancelled()

    async def soon() -> int:
        await clock.sleep(1.0)
        return 7

    assert await wait_for(clock, soon(), 5.0) == 7
    assert await wait_for(clock, soon(), None) == 7
    await clock.stop()


async def test_wait_for_on_the_wall_clock_keeps_the_same_contract() -> None:
    system = SystemClock()
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError, match=r"timed out after 0\.01 s"):
        await wait_for(system, never, 0.01)
    assert never.cancelled()
    cleaned_up = asyncio.Event()

    async def slow() -> int:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            cleaned_up.set()
        return 0

    with pytest.raises(TimeoutError):
        await wait_for(system, slow(), 0.0)
    assert cleaned_up.is_set()  # the awaitable's cleanup ran before the timeout was raised

    async def own_timeout() -> int:
        raise TimeoutError("the awaitable's own")

    with pytest.raises(TimeoutError, match="the awaitable's own"):
        await wait_for(system, own_timeout(), 5.0)
    assert await wait_for(system, asyncio.sleep(0, result=7), 5.0) == 7


async def test_background_turns_let_the_loop_read_between_them() -> None:
    """Work waiting for a turn runs one piece per pass of the loop, with the readable fds
    served between two pieces (a device's frame never waits for every run's record)."""
    loop = asyncio.get_running_loop()
    reader, writer = socket.socketpair()
    writer.send(b"x")  # readable on every pass until the end
    log: list[str] = []
    loop.add_reader(reader.fileno(), log.append, "read")

    async def piece(name: str) -> None:
        await background_turn(SystemClock())
        log.append(name)

    try:
        await asyncio.gather(*(piece(f"piece {n}") for n in range(4)))
    finally:
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()
    pieces = [entry for entry in log if entry != "read"]
    assert pieces == [f"piece {n}" for n in range(4)]  # in the order they asked
    between = [log[log.index(a) + 1 : log.index(b)] for a, b in itertools.pairwise(pieces)]
    assert all("read" in entries for entries in between), log


async def test_a_cancelled_background_turn_passes_to_the_next() -> None:
    clock = SystemClock()
    done: list[int] = []

    async def piece(number: int) -> None:
        await background_turn(clock)
        done.append(number)

    tasks = [asyncio.ensure_future(piece(n)) for n in range(3)]
    await asyncio.sleep(0)  # all three wait for their turn
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert done == [0, 2]
    assert isinstance(results[1], asyncio.CancelledError)
    await background_turn(clock)  # the lane still turns after the cancellation


async def test_background_turn_does_not_wait_on_virtual_time(clock: VirtualClock) -> None:
    """A simulated run stays deterministic: on the virtual clock a turn is no wait."""
    turn = background_turn(clock).__await__()
    with pytest.raises(StopIteration):
        turn.send(None)  # finished without yielding to the loop


async def test_system_clock_satisfies_the_protocol() -> None:
    system = SystemClock()
    assert isinstance(system, Clock)
    before = system.now_s()
    await system.sleep(0)
    assert system.now_s() >= before


def test_every_error_derives_from_the_root() -> None:
    classes = [
        value
        for value in vars(errors_module).values()
        if isinstance(value, type) and issubclass(value, Exception)
    ]
    assert len(classes) >= 15
    assert all(issubclass(cls, DeviceBridgeError) for cls in classes)
    for cls in classes:
        assert cls.__name__ in (errors_module.__doc__ or ""), f"{cls.__name__} not in the tree"


async def test_pending_command_fails_fast_when_the_link_drops(
    world: SimulatedWorld, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    massager = world.add_massager()
    async with world:
        clock.start()
        found = await find_device(clock, lambda d: True, 2.0, world.scanner_backend)
        session = ble_session(world, found, command_timeout_s=30.0)
        assert isinstance(session, MassagerSession)
        await session.start()
        with monkeypatch.context() as patch:
            patch.setattr(massager, "receive", lambda channel, data: None)
            pending = asyncio.ensure_future(session.send(Ping()))
            await clock.sleep(0.5)
            world.drop_link(massager, out_of_range_s=1.0)
            with pytest.raises(ConnectionLostError):
                await pending
        with pytest.raises(NotConnectedError):
            await session.send(Ping())
        await session.wait_ready(timeout_s=10.0)
        assert (await session.send(Ping())).ok
        await session.close()
        assert session.state is ConnectionState.CLOSED


async def test_session_without_auto_reconnect_goes_disconnected(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        clock.start()
        found = await find_device(clock, lambda d: True, 2.0, world.scanner_backend)
        session = ble_session(world, found, auto_reconnect=False)
        await session.start()
        world.drop_link(massager)
        assert session.state is ConnectionState.DISCONNECTED
        await clock.sleep(2.0)
        assert session.state is ConnectionState.DISCONNECTED
        await session.close()
