"""What a sample's raw fields mean to the engines: zones, flags and units.

The zone codes and flags are the wire's (``protocols``); the units are those of the sample
formats (``protocols.telemetry``: pressure in 10 Pa, temperature in 0.01 °C, irradiance in
0.01 mW/cm²).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from protocols.constants import Zone
from protocols.telemetry import MASSAGER_FLAG_CONTACT, MASSAGER_FLAG_MOTOR_ON

# Zone codes of the wire, as the names routines use.
ZONE_NAMES: Final[Mapping[int, str]] = {
    int(zone): zone.name.lower() for zone in Zone if zone is not Zone.NONE
}
ZONE_CODES: Final[Mapping[str, int]] = {name: code for code, name in ZONE_NAMES.items()}
MIN_ZONE_CODE: Final = min(ZONE_NAMES)
MAX_ZONE_CODE: Final = max(ZONE_NAMES)
CONTACT_FLAG: Final = MASSAGER_FLAG_CONTACT
MOTOR_FLAG: Final = MASSAGER_FLAG_MOTOR_ON
KPA_PER_UNIT: Final = 0.01
CELSIUS_PER_UNIT: Final = 0.01
MW_CM2_PER_UNIT: Final = 0.01


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
