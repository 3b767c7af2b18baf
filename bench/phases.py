"""When a bench's simulated devices boot: at random phases within one batch interval.

Independent radios share no clock, so their notifications arrive spread over each batch
interval. Devices that all boot at one instant of one simulated clock send theirs together
instead, one burst per interval, which lets the host's event loop take several
notifications per wake-up with its code still hot: the cheapest arrival pattern there is,
and not one a fleet of real devices produces. Seeded: every run and every case of a bench
sees the same phases.
"""

from __future__ import annotations

import random


def boot_delays_s(count: int, interval_s: float, seed: int) -> list[float]:
    """Waits between ``count`` device boots (the first from now): their phases are seeded
    random points within one ``interval_s``."""
    rng = random.Random(seed)
    phases_s = sorted(rng.uniform(0, interval_s) for _ in range(count))
    return [b - a for a, b in zip([0.0, *phases_s], phases_s, strict=False)]
