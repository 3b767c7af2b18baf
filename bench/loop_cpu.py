"""Where a process's event loop spends its CPU: each callback's thread CPU time, by what it
runs.

A diagnostic for the benches' tables, not a baseline and in no ratio. While a
:class:`LoopCpu` is active, every callback the running event loop runs goes through
asyncio's ``Handle._run`` (a task's every step is one, as is every ``call_soon`` and timer);
each is timed with the thread's CPU clock and counted under a label: a task's step under
its coroutine's name (``task _Connection._read``), any other callback under its function's
(``_SelectorSocketTransport._read_ready``). Two reads of that clock come with every callback
(a system call each on these virtual machines), so figures taken with it are taken in runs
of their own, never in the runs a ratio comes from.

One process, one thread: the loop that runs while it is active. Work outside callbacks
(the loop's own polling, other threads) is what the process's CPU has beyond their sum.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any


def callback_label(callback: Callable[..., Any]) -> str:
    """What a loop callback runs: the coroutine of a task's step, else the function."""
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coroutine = owner.get_coro()
        name = getattr(coroutine, "__qualname__", None) or type(coroutine).__name__
        return f"task {name}"
    name = getattr(callback, "__qualname__", None)
    return name if isinstance(name, str) else type(callback).__qualname__


class LoopCpu:
    """Thread CPU seconds and calls of the loop's callbacks, by label, while entered."""

    def __init__(self) -> None:
        self.cpu_s: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._original: Callable[[asyncio.Handle], None] | None = None

    def __enter__(self) -> LoopCpu:
        if self._original is not None:
            raise RuntimeError("LoopCpu is already active")
        original = asyncio.events.Handle._run
        cpu_s, calls, clock = self.cpu_s, self.calls, time.thread_time

        def timed_run(handle: asyncio.Handle) -> None:
            started_s = clock()
            try:
                original(handle)
            finally:
                label = callback_label(handle._callback)  # type: ignore[attr-defined]
                cpu_s[label] += clock() - started_s
                calls[label] += 1

        self._original = original
        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._original is not None:
            asyncio.events.Handle._run = self._original  # type: ignore[method-assign,assignment]
            self._original = None
