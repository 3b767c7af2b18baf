"""Time as the host sees it: an injectable clock.

Every wait in devicebridge (command timeouts, reconnect backoff, scan windows)
goes through a :class:`Clock`, so tests run on the simulator's virtual clock
and never depend on wall-clock sleeps. ``simulators.VirtualClock`` satisfies
the protocol structurally; the host never imports it outside the composition
root.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Awaitable
from concurrent.futures import Future
from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


@runtime_checkable
class Clock(Protocol):
    def now_s(self) -> float:
        """Seconds on this clock's monotonic time line."""
        ...

    async def sleep(self, delay_s: float) -> None:
        """Return when ``delay_s`` seconds of this clock's time have passed."""
        ...


class SystemClock:
    """Wall-clock time (monotonic) and :func:`asyncio.sleep`."""

    def now_s(self) -> float:
        return time.monotonic()

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(max(0.0, delay_s))


async def wait_for(clock: Clock, awaitable: Awaitable[T], timeout_s: float | None) -> T:
    """Like :func:`asyncio.wait_for`, but the timeout runs on ``clock``.

    Raises :class:`TimeoutError` when ``timeout_s`` of clock time pass first;
    the awaitable is then cancelled. ``None`` waits without a limit.
    """
    if timeout_s is not None and isinstance(clock, SystemClock):
        # The loop's own timer (the loop's time is this clock's): no timer task and no
        # asyncio.wait per call, which every command to every device pays.
        scope = asyncio.timeout(max(0.0, timeout_s))
        try:
            async with scope:
                return await awaitable
        except TimeoutError:
            if scope.expired():
                raise TimeoutError(f"timed out after {timeout_s:g} s") from None
            raise  # the awaitable's own
    task = asyncio.ensure_future(awaitable)
    if timeout_s is None:
        return await task
    timer = asyncio.ensure_future(clock.sleep(timeout_s))
    try:
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        timer.cancel()
        raise
    if task.done():
        timer.cancel()
        return task.result()
    task.cancel()
    # Let the cancellation land so the awaitable's cleanup runs before we report.
    await asyncio.gather(task, return_exceptions=True)
    raise TimeoutError(f"timed out after {timeout_s:g} s")


def _may_yield(clock: Clock) -> bool:
    """Whether the running task may let the loop run while it waits: on the wall clock,
    and not while it is being cancelled (a clock whose time moves only when driven would
    jump ahead meanwhile; a cancelled task finishes its work at once)."""
    task = asyncio.current_task()
    return isinstance(clock, SystemClock) and not (task is not None and task.cancelling())


async def result_off_loop(clock: Clock, job: Future[T]) -> T:
    """The result of ``job``, which runs on another thread (a store's writer).

    On the wall clock the event loop serves every other device while the job runs. A
    clock whose time moves only when it is driven (the simulators' virtual clock) would
    jump ahead while the loop waits, so there, and in a task being cancelled, the result
    is waited for without yielding: a simulated run stays deterministic, and a cancelled
    run still stores what it must. A cancellation that arrives while waiting lets the
    job finish first, then goes on.
    """
    if not _may_yield(clock):
        return job.result()
    try:
        result = await asyncio.shield(asyncio.wrap_future(job))
    except asyncio.CancelledError:
        job.result()
        raise
    # The answers of many jobs come together (one read of the writer's pipe): what each
    # caller does with its own takes its turn (:func:`background_turn`).
    await background_turn(clock)
    return result


async def background_turn(clock: Clock) -> None:
    """Wait for this task's turn at work that can wait a pass of the event loop.

    A run's start and end (its records, its first commands) and the commands that resume
    a paused device take turns: one such piece of work per pass of the loop, and between
    two of them the loop reads what the devices sent. When a hundred runs end on the same
    sample (every device's session ends at its third excursion above the cap), their
    pieces otherwise came in one pass, and the frames that came meanwhile waited for all
    of them: ``python -m bench latency``'s runs at 100 devices (2 cores, one 8-s window
    each) gave a p99 of 2.3-10.6 ms, median 8.3, in eight runs, and 1.5-5.3 ms, median
    2.9, in nineteen with the turns. Safety stops never wait for a turn. On a clock whose
    time moves only when driven (the simulators' virtual clock), and in a task being
    cancelled, there is no wait: a simulated run stays deterministic, and a cancelled one
    finishes its work at once.
    """
    if not _may_yield(clock):
        return
    loop = asyncio.get_running_loop()
    lane = _LANES.get(loop)
    if lane is None:
        lane = _LANES[loop] = _BackgroundLane(loop)
    await lane.turn()


class _BackgroundLane:
    """The waiters for :func:`background_turn` on one event loop, released one per pass.

    A waiter released in one pass runs in the next (its wake-up is scheduled), before the
    release of the following one: so every pass runs at most one piece of waiting work,
    after the frames read at its start.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._releasing = False

    def turn(self) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiting.append(waiter)
        if not self._releasing:
            self._releasing = True
            self._loop.call_soon(self._release_one)
        return waiter

    def _release_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():  # a cancelled waiter gives its turn to the next
                waiter.set_result(None)
                break
        if self._waiting:
            self._loop.call_soon(self._release_one)
        else:
            self._releasing = False


_LANES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _BackgroundLane] = (
    weakref.WeakKeyDictionary()
)
