"""A virtual clock for the simulated devices and for the host under test.

Every simulated device waits on a :class:`VirtualClock` instead of the wall
clock, so a test can run ten minutes of device time in a fraction of a second
and get the same result every run. The clock satisfies the host's ``Clock``
protocol (``now_s`` and ``sleep``) structurally, so the host's own timeouts
and backoffs can run on it too.

Two modes:

* **fast** (default): time only moves when someone drives it, with
  :meth:`VirtualClock.advance`, :meth:`VirtualClock.run_until` or the
  background driver (:meth:`VirtualClock.start`, which jumps from deadline to
  deadline as fast as the CPU allows). Between two jumps the driver yields to
  the event loop a few times so that woken tasks, callbacks and pty I/O run
  before time moves on.
* **realtime**: the same deadlines, paced to the wall clock times ``speed``.

Sleepers that share a deadline wake in the order they went to sleep, so a run
is deterministic as long as the code under test is.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Sized
from typing import Final, NamedTuple

# Enough loop iterations for a chain like "device notifies -> host callback queues
# -> host task decodes -> host task resolves a future -> waiting task resumes".
DEFAULT_YIELDS_PER_STEP: Final = 8
# Deadlines this close past a target count as due: 5.0 + 0.1 is 5.1 but 51 * 0.1
# is 5.1000000000000005, and advance(0.1) must still reach that tick.
TIME_RESOLUTION_S: Final = 1e-9


class _Sleeper(NamedTuple):
    """A heap entry; sleepers order by deadline, then by when they went to sleep.

    A tuple, so the heap compares in C; ``order`` is unique, so ``future`` is never compared.
    """

    deadline_s: float
    order: int
    future: asyncio.Future[None]


class VirtualClock:
    """Virtual time in seconds, starting at ``start_s``.

    Nobody moves fast time but its drivers: a task that sleeps on the clock
    while nothing drives it sleeps forever, which is exactly what a test wants
    when it steps time by hand.
    """

    def __init__(
        self,
        *,
        realtime: bool = False,
        speed: float = 1.0,
        start_s: float = 0.0,
        yields_per_step: int = DEFAULT_YIELDS_PER_STEP,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        if yields_per_step < 1:
            raise ValueError(f"yields_per_step must be at least 1, got {yields_per_step}")
        self.realtime = realtime
        self.speed = speed
        self.yields_per_step = yields_per_step
        self._now_s = start_s
        self._heap: list[_Sleeper] = []
        self._order = itertools.count()
        self._driving = False
        self._limit_s: float | None = None
        self._driver: asyncio.Task[None] | None = None
        self._new_sleeper: asyncio.Event | None = None
        # Realtime pacing maps wall time to virtual time from one anchor, so that
        # rounding errors of individual waits never accumulate into drift.
        self._anchor_wall_s = 0.0
        self._anchor_virtual_s = 0.0
        self._settle_hooks: list[Callable[[], Awaitable[None]]] = []
        self._io_links = 0  # links whose deliveries take wall time (ptys, sockets)

    # ------------------------------------------------------------------ the Clock protocol

    def now_s(self) -> float:
        """Current virtual time in seconds."""
        if self.realtime and self._driving:
            flowing_s = self._anchor_virtual_s + (time.monotonic() - self._anchor_wall_s) * (
                self.speed
            )
            # Time never runs past a deadline that has not been processed yet, so
            # a woken sleeper never sees a time earlier than its own deadline.
            next_deadline_s = self._next_deadline_s()
            if next_deadline_s is not None:
                flowing_s = min(flowing_s, next_deadline_s)
            if self._limit_s is not None:
                flowing_s = min(flowing_s, self._limit_s)
            return max(self._now_s, flowing_s)
        return self._now_s

    async def sleep(self, delay_s: float) -> None:
        """Return when ``delay_s`` seconds of virtual time have passed."""
        if delay_s <= 0:
            await asyncio.sleep(0)
            return
        await self.sleep_until(self.now_s() + delay_s)

    async def sleep_until(self, t_s: float) -> None:
        """Return when virtual time reaches ``t_s`` (at once if it already has)."""
        if t_s <= self.now_s():
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, _Sleeper(t_s, next(self._order), future))
        if self._new_sleeper is not None:
            self._new_sleeper.set()
        await future

    # ------------------------------------------------------------------ drivers

    @property
    def is_running(self) -> bool:
        """Whether the background driver started by :meth:`start` runs."""
        return self._driver is not None and not self._driver.done()

    @property
    def pending_sleepers(self) -> int:
        self._drop_cancelled()
        return sum(1 for s in self._heap if not s.future.done())

    async def advance(self, duration_s: float) -> None:
        """Move time forward by ``duration_s``, waking every sleeper on the way in order."""
        if duration_s < 0:
            raise ValueError(f"cannot advance by a negative duration ({duration_s})")
        self._require_not_running("advance")
        target_s = self.now_s() + duration_s
        self._begin_drive(target_s)
        try:
            await self._yield()
            await self._drive_to(target_s, None)
        finally:
            self._end_drive(target_s)
        await self._yield()

    async def run_until(self, predicate: Callable[[], bool], max_virtual_s: float) -> bool:
        """Advance deadline by deadline until ``predicate()`` holds; ``False`` after the limit.

        The predicate is checked after the event loop has had its turn at every
        step, so it sees the effects of every task woken at that time.
        """
        self._require_not_running("run_until")
        limit_s = self.now_s() + max_virtual_s
        self._begin_drive(limit_s)
        reached_limit = False
        try:
            await self._yield()
            if predicate():
                return True
            reached_limit = not await self._drive_to(limit_s, predicate)
        finally:
            self._end_drive(limit_s if reached_limit else None)
        if reached_limit:
            await self._yield()
        return predicate()

    def start(self) -> None:
        """Start the background driver (autojump when fast, paced when realtime)."""
        if self.is_running:
            return
        self._driver = asyncio.get_running_loop().create_task(
            self._drive_forever(), name="VirtualClock driver"
        )

    async def stop(self) -> None:
        """Stop the background driver; virtual time stays where it was."""
        driver, self._driver = self._driver, None
        if driver is None:
            return
        driver.cancel()
        results = await asyncio.gather(driver, return_exceptions=True)
        error = results[0]
        if isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
            raise error

    def add_settle_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Await ``hook()`` before waking the sleepers of every deadline.

        A transport whose deliveries take loop turns and wall time (the link-level
        mode's virtual controllers) returns from its hook once nothing is in
        flight, so that virtual time never overtakes its traffic.
        """
        self._settle_hooks.append(hook)

    def remove_settle_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        if hook in self._settle_hooks:
            self._settle_hooks.remove(hook)

    def attach_io_link(self) -> None:
        """A link whose data takes wall time to arrive (a pty, a socket) is in use.

        While one is, every step gives the loop all ``yields_per_step`` turns: a pty
        hands written bytes to its other side asynchronously (the kernel's flip buffer),
        so a loop that looks idle may still have data on the way.
        """
        self._io_links += 1

    def detach_io_link(self) -> None:
        self._io_links = max(0, self._io_links - 1)

    # ------------------------------------------------------------------ internals

    def _require_not_running(self, what: str) -> None:
        if self.is_running:
            raise RuntimeError(f"cannot {what}() while the background driver runs; stop() it")
        if self._driving:
            raise RuntimeError(f"cannot {what}() while another advance() or run_until() runs")

    def _begin_drive(self, limit_s: float | None) -> None:
        self._driving = True
        self._limit_s = limit_s
        self._anchor_wall_s = time.monotonic()
        self._anchor_virtual_s = self._now_s
        self._new_sleeper = asyncio.Event()

    def _end_drive(self, final_s: float | None = None) -> None:
        if final_s is not None:
            self._now_s = max(self._now_s, final_s)
        elif self.realtime:
            self._now_s = self.now_s()
        self._driving = False
        self._limit_s = None
        self._new_sleeper = None

    async def _drive_to(self, target_s: float, predicate: Callable[[], bool] | None) -> bool:
        """Step through every deadline up to ``target_s``; ``True`` if ``predicate`` held."""
        while True:
            while await self._step(target_s):
                if predicate is not None and predicate():
                    return True
            # Realtime: an earlier sleeper may arrive while waiting for the target.
            if await self._wait_until(target_s):
                return False

    async def _drive_forever(self) -> None:
        self._begin_drive(None)
        try:
            while True:
                await self._yield()
                while await self._step(None):
                    pass
                assert self._new_sleeper is not None
                self._new_sleeper.clear()
                if self._next_deadline_s() is None:
                    await self._new_sleeper.wait()
        finally:
            self._end_drive()

    async def _step(self, limit_s: float | None) -> bool:
        """Wake the sleepers of the next deadline up to ``limit_s``, then let them run.

        Returns ``False`` when no deadline is left within the limit.
        """
        deadline_s = self._next_deadline_s()
        if deadline_s is None or (limit_s is not None and deadline_s > limit_s + TIME_RESOLUTION_S):
            return False
        if self.realtime and not await self._wait_until(deadline_s):
            return True  # an earlier sleeper arrived while waiting: re-plan
        if self._settle_hooks:
            for hook in tuple(self._settle_hooks):
                await hook()
            next_deadline_s = self._next_deadline_s()
            if next_deadline_s is not None and next_deadline_s < deadline_s:
                return True  # an earlier sleeper arrived while settling: re-plan
        self._now_s = max(self._now_s, deadline_s)
        while self._heap and self._heap[0].deadline_s <= self._now_s:
            sleeper = heapq.heappop(self._heap)
            if not sleeper.future.done():
                sleeper.future.set_result(None)
        await self._yield()
        return True

    async def _wait_until(self, virtual_s: float) -> bool:
        """Realtime: wait for the wall time of ``virtual_s``; ``False`` if interrupted.

        A new sleeper interrupts the wait, because it may be due before ``virtual_s``.
        """
        if not self.realtime:
            return True
        while True:
            wall_deadline_s = (
                self._anchor_wall_s + (virtual_s - self._anchor_virtual_s) / self.speed
            )
            remaining_s = wall_deadline_s - time.monotonic()
            if remaining_s <= 0:
                return True
            event = self._new_sleeper
            assert event is not None
            event.clear()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that arrives as the event is set, and stop() then waited forever
            # for a driver that went on running.
            try:
                async with asyncio.timeout(remaining_s):
                    await event.wait()
            except TimeoutError:
                return True
            next_deadline_s = self._next_deadline_s()
            if next_deadline_s is not None and next_deadline_s < virtual_s:
                return False

    def _next_deadline_s(self) -> float | None:
        self._drop_cancelled()
        return self._heap[0].deadline_s if self._heap else None

    def _drop_cancelled(self) -> None:
        # A sleeper cancelled by its task (a timeout that lost its race) must not
        # hold time back or count as pending work.
        while self._heap and self._heap[0].future.done():
            heapq.heappop(self._heap)

    async def _yield(self) -> None:
        """Let woken tasks, their callbacks and ready I/O run before time moves on.

        Up to ``yields_per_step`` loop turns, but no more once the loop is idle: a turn
        that found nothing else to run (no ready callback, no due timer, and its poll saw
        no I/O, whose callbacks would be queued behind this task's) means every
        in-process chain has finished. The asyncio event loop keeps its run queue in
        ``_ready`` and its timers in ``_scheduled``; a loop without them (not the standard
        loop), or a clock with an I/O link attached (:meth:`attach_io_link`), always gets
        every turn.
        """
        loop = asyncio.get_running_loop()
        ready: Sized | None = None
        timers: list[asyncio.TimerHandle] | None = None
        if not self._io_links:
            ready = getattr(loop, "_ready", None)
            timers = getattr(loop, "_scheduled", None)
        for _ in range(self.yields_per_step):
            await asyncio.sleep(0)
            if (
                ready is not None
                and timers is not None
                and not len(ready)
                and not (timers and timers[0].when() <= loop.time())
            ):
                return  # idle: nothing more will happen before time moves
