"""What a sample's raw fields mean to the engines: zones, flags and units, all the wire's
(``protocols.constants``, ``protocols.telemetry``), under the names the engines use.
"""

from __future__ import annotations

import math
from typing import Final

from protocols.constants import ZONE_CODES, ZONE_NAMES
from protocols.telemetry import (
    IRRADIANCE_MW_CM2_PER_UNIT,
    MASSAGER_FLAG_CONTACT,
    MASSAGER_FLAG_MOTOR_ON,
    PRESSURE_KPA_PER_UNIT,
    TEMPERATURE_C_PER_UNIT,
)

__all__ = [
    "CELSIUS_PER_UNIT",
    "CONTACT_FLAG",
    "KPA_PER_UNIT",
    "MAX_ZONE_CODE",
    "MIN_ZONE_CODE",
    "MOTOR_FLAG",
    "MW_CM2_PER_UNIT",
    "ZONE_CODES",
    "ZONE_NAMES",
    "first_count_above",
    "first_count_at_least",
]

MIN_ZONE_CODE: Final = min(ZONE_NAMES)
MAX_ZONE_CODE: Final = max(ZONE_NAMES)
CONTACT_FLAG: Final = MASSAGER_FLAG_CONTACT
MOTOR_FLAG: Final = MASSAGER_FLAG_MOTOR_ON
KPA_PER_UNIT: Final = PRESSURE_KPA_PER_UNIT
CELSIUS_PER_UNIT: Final = TEMPERATURE_C_PER_UNIT
MW_CM2_PER_UNIT: Final = IRRADIANCE_MW_CM2_PER_UNIT


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
