"""Notifications on their way through the virtual controllers, so that virtual time waits.

The devices sample on the virtual clock; their notifications cross bumble's
stacks in loop turns and wall time. The world registers :meth:`InFlight.settle`
as the clock's settle hook: before the clock wakes the sleepers of a deadline,
every notification a device sent earlier has reached the host (or its link has
gone), exactly as with the in-process backend, which delivers synchronously.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

_LOGGER = logging.getLogger(__name__)

# Wall seconds; a hang safety net only (a notification takes well under 1 ms).
DEFAULT_SETTLE_SAFETY_S: Final = 1.0


class InFlight:
    """Counts notifications per link (keyed by the peripheral's on-air address)."""

    def __init__(self, safety_s: float = DEFAULT_SETTLE_SAFETY_S) -> None:
        self.safety_s = safety_s
        self._counts: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.stalls = 0  # settles given up after safety_s (a stuck pipeline)

    @property
    def pending(self) -> int:
        return sum(self._counts.values())

    def queued(self, key: str) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1
        self._idle.clear()

    def done(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)
        if not self._counts:
            self._idle.set()

    def reset(self, key: str) -> None:
        """The link is gone: what was in flight on it is lost with it."""
        self._counts.pop(key, None)
        if not self._counts:
            self._idle.set()

    async def settle(self) -> None:
        """Return once nothing is in flight (or after the safety net, with a warning)."""
        if self._idle.is_set():
            return
        try:
            await asyncio.wait_for(self._idle.wait(), self.safety_s)
        except TimeoutError:
            self.stalls += 1
            _LOGGER.warning(
                "%d notification(s) still in flight after %.1f s; letting time move on",
                self.pending,
                self.safety_s,
            )
            self._counts.clear()
            self._idle.set()
