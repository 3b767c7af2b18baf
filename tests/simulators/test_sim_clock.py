"""VirtualClock: ordering, advance, run_until and the background drivers."""

from __future__ import annotations

import asyncio

import pytest

from simulators import VirtualClock

WALL_FAILSAFE_S = 5.0  # only guards against a hang; never decides a result


async def test_sleepers_wake_in_deadline_order_and_fifo_on_ties(clock: VirtualClock) -> None:
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, delay_s: float) -> None:
        await clock.sleep(delay_s)
        woke.append((name, clock.now_s()))

    tasks = [
        asyncio.create_task(sleeper(name, delay))
        for name, delay in [("c", 3.0), ("a", 1.0), ("b1", 2.0), ("b2", 2.0)]
    ]
    await clock.advance(2.5)
    assert woke == [("a", 1.0), ("b1", 2.0), ("b2", 2.0)]
    assert clock.now_s() == 2.5
    await clock.advance(1.0)
    assert woke[-1] == ("c", 3.0)
    await asyncio.gather(*tasks)


async def test_nothing_moves_without_a_driver(clock: VirtualClock) -> None:
    task = asyncio.create_task(clock.sleep(1.0))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()
    assert clock.now_s() == 0.0
    await clock.advance(1.0)
    assert task.done()


async def test_cancelled_sleeper_does_not_hold_time(clock: VirtualClock) -> None:
    task = asyncio.create_task(clock.sleep(5.0))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert clock.pending_sleepers == 0
    assert await clock.run_until(lambda: False, max_virtual_s=10.0) is False
    assert clock.now_s() == 10.0


async def test_sleep_until_past_returns_at_once(clock: VirtualClock) -> None:
    await clock.advance(2.0)
    await asyncio.wait_for(clock.sleep_until(1.0), WALL_FAILSAFE_S)
    await asyncio.wait_for(clock.sleep(0), WALL_FAILSAFE_S)


async def test_chained_tasks_run_between_jumps(clock: VirtualClock) -> None:
    queue: asyncio.Queue[float] = asyncio.Queue()
    seen: list[float] = []

    async def producer() -> None:
        for _ in range(5):
            await clock.sleep(1.0)
            queue.put_nowait(clock.now_s())

    async def consumer() -> None:
        while True:
            value = await queue.get()
            seen.append((value, clock.now_s()))  # type: ignore[arg-type]

    tasks = [asyncio.create_task(producer()), asyncio.create_task(consumer())]
    await clock.advance(5.0)
    # The consumer saw every value at the same virtual time it was produced.
    assert seen == [(t, t) for t in (1.0, 2.0, 3.0, 4.0, 5.0)]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_run_until_stops_at_the_first_true_step(clock: VirtualClock) -> None:
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            await clock.sleep(0.25)
            ticks.append(clock.now_s())

    task = asyncio.create_task(ticker())
    assert await clock.run_until(lambda: len(ticks) >= 6, max_virtual_s=100.0)
    assert clock.now_s() == 1.5
    assert not await clock.run_until(lambda: len(ticks) >= 100, max_virtual_s=1.0)
    assert clock.now_s() == 2.5
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_fast_background_driver_autojumps(clock: VirtualClock) -> None:
    clock.start()
    try:
        await asyncio.wait_for(clock.sleep(3600.0), WALL_FAILSAFE_S)
        assert clock.now_s() >= 3600.0
        with pytest.raises(RuntimeError):
            await clock.advance(1.0)
    finally:
        await clock.stop()
    assert not clock.is_running


async def test_realtime_driver_is_paced_by_speed() -> None:
    clock = VirtualClock(realtime=True, speed=1000.0)
    clock.start()
    try:
        order: list[int] = []

        async def sleeper(index: int, delay_s: float) -> None:
            await clock.sleep(delay_s)
            order.append(index)

        await asyncio.wait_for(
            asyncio.gather(sleeper(2, 0.2), sleeper(1, 0.1), sleeper(3, 0.3)), WALL_FAILSAFE_S
        )
        assert order == [1, 2, 3]
        assert clock.now_s() >= 0.3
    finally:
        await clock.stop()


async def test_realtime_advance_ends_exactly_at_target() -> None:
    clock = VirtualClock(realtime=True, speed=100.0)
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep(0.5)
        woke.append(clock.now_s())

    task = asyncio.create_task(sleeper())
    await asyncio.wait_for(clock.advance(1.0), WALL_FAILSAFE_S)
    await task
    assert clock.now_s() == 1.0
    assert woke
    assert 0.5 <= woke[0] <= 1.0


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="speed"):
        VirtualClock(speed=0)
    with pytest.raises(ValueError, match="yields"):
        VirtualClock(yields_per_step=0)


async def test_a_realtime_driver_stops_even_as_a_new_sleeper_interrupts_its_wait() -> None:
    # The driver waits for the wall time of a far deadline; a new sleeper (every device
    # tick makes one) interrupts that wait in the very loop turn in which stop() cancels
    # the driver. Python 3.11's asyncio.wait_for returned normally there and the driver
    # went on running, so stop() waited forever (the demo hung at its end).
    clock = VirtualClock(realtime=True, speed=1.0)
    clock.start()
    far = asyncio.ensure_future(clock.sleep(100.0))
    await asyncio.sleep(0.01)  # the driver is now waiting for 100 s of wall time
    # Both start in the next loop turn, in this order: a new sleeper, then stop().
    newcomer = asyncio.ensure_future(clock.sleep(50.0))
    stopping = asyncio.ensure_future(clock.stop())
    async with asyncio.timeout(WALL_FAILSAFE_S):
        await stopping
    assert not clock.is_running
    for sleeper in (far, newcomer):
        sleeper.cancel()
    await asyncio.gather(far, newcomer, return_exceptions=True)
