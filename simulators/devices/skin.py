"""The skin and the room that a device's temperature sensor meets.

One person's forehead, for every simulated device: a device model adds how its own
sensor and light warm or follow it.
"""

from __future__ import annotations

from typing import Final

# Forehead skin baseline 33.4 +- 0.8 degC (domain-safety.md, Temperature [A]).
SKIN_BASELINE_C: Final = 33.4
SKIN_BASELINE_SPREAD_C: Final = 0.8
# The room, what a sensor off the skin reads.
AMBIENT_C: Final = 24.0
