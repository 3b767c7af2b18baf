"""Exponential backoff with full jitter, from an injected random source.

Full jitter (a uniform draw between zero and the exponential cap) spreads the
reconnects of many devices that lost their links at the same moment (one
adapter, one radio) instead of letting them retry in lock step. The random
source is injected so that a seeded run is reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial_s: float = 0.25
    multiplier: float = 2.0
    max_s: float = 30.0
    # A link that stayed up this long counts as healthy: the next loss starts
    # over from ``initial_s`` rather than from where the last outage left off.
    stable_after_s: float = 10.0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        if self.multiplier < 1:
            raise ValueError("backoff multiplier must be >= 1")
        if self.stable_after_s < 0:
            raise ValueError("stable_after_s must be >= 0")

    def cap_s(self, attempt: int) -> float:
        """Upper bound of the delay before retry number ``attempt`` (0-based)."""
        # Computed in a loop capped at max_s so that huge attempt counts never overflow.
        cap = self.initial_s
        for _ in range(attempt):
            cap *= self.multiplier
            if cap >= self.max_s:
                return self.max_s
        return min(cap, self.max_s)


class Backoff:
    """Delays for successive reconnect attempts."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random) -> None:
        self.policy = policy
        self._rng = rng
        self._attempt = 0
        self._connected_at_s: float | None = None

    @property
    def attempt(self) -> int:
        return self._attempt

    def next_delay_s(self) -> float:
        cap = self.policy.cap_s(self._attempt)
        self._attempt += 1
        return self._rng.uniform(0.0, cap)

    def reset(self) -> None:
        self._attempt = 0

    def on_connected(self, now_s: float) -> None:
        self._connected_at_s = now_s

    def on_link_lost(self, now_s: float) -> None:
        """Reset the attempt count if the link that just went down had been stable."""
        if (
            self._connected_at_s is not None
            and now_s - self._connected_at_s >= self.policy.stable_after_s
        ):
            self.reset()
        self._connected_at_s = None
