"""What a sample's raw fields mean to the engines: the range of zone codes, and whole counts
of raw readings at a limit. Zones, flags and units are the wire's (``protocols.constants``,
``protocols.telemetry``) and imported from there.
"""

from __future__ import annotations

import math
from typing import Final

from protocols.constants import ZONE_CODES, ZONE_NAMES

__all__ = [
    "MAX_ZONE_CODE",
    "MIN_ZONE_CODE",
    "ZONE_CODES",
    "ZONE_NAMES",
    "first_count_above",
    "first_count_at_least",
]

MIN_ZONE_CODE: Final = min(ZONE_NAMES)
MAX_ZONE_CODE: Final = max(ZONE_NAMES)


def first_count_at_least(threshold: float, unit: float) -> int:
    """The smallest whole count ``n`` with ``n * unit >= threshold``, compared as floats.

    ``n * unit`` never decreases as ``n`` grows (``unit > 0``), so a raw reading ``r``
    gives ``r * unit >= threshold`` exactly when ``r >= n``: a comparison of raw integer
    readings with such counts decides as the comparison of the readings in units would.
    """
    n = math.ceil(threshold / unit)
    while (n - 1) * unit >= threshold:
        n -= 1
    while n * unit < threshold:
        n += 1
    return n


def first_count_above(threshold: float, unit: float) -> int:
    """The smallest whole count ``n`` with ``n * unit > threshold`` (see above)."""
    n = math.floor(threshold / unit)
    while (n - 1) * unit > threshold:
        n -= 1
    while n * unit <= threshold:
        n += 1
    return n
