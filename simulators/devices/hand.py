"""A scripted hand holding the massager: where it is on the face and how hard it presses.

A :class:`HandScript` is a timeline of :class:`HandSegment` s. Between segments
the head is off the skin. The script gives the *true* pressure; the massager
adds sensor noise from its own seeded generator (see
:meth:`HandScript.noise_sigma_kpa`), so one script can drive many devices.

Pressure bands per zone come from ``domain-safety.md`` ("suggested target bands
under the head", tagged [E]: estimates, not facts). The default hand stays
inside them with a margin so that a correct host never warns on it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from protocols import Zone

# Sensor noise: a floor from the ADC plus a part proportional to the load (a
# hand never presses perfectly steadily).
DEFAULT_NOISE_FLOOR_KPA: Final = 0.03
DEFAULT_NOISE_FRACTION: Final = 0.03

# domain-safety.md, "suggested target bands under the head" [E], as (low, high) kPa.
ZONE_PRESSURE_BANDS_KPA: Final[dict[Zone, tuple[float, float]]] = {
    Zone.EYE_AREA_LEFT: (0.5, 3.0),
    Zone.EYE_AREA_RIGHT: (0.5, 3.0),
    Zone.FOREHEAD: (3.0, 15.0),
    Zone.CHEEK_LEFT: (3.0, 15.0),
    Zone.CHEEK_RIGHT: (3.0, 15.0),
    Zone.NASOLABIAL_LEFT: (3.0, 15.0),
    Zone.NASOLABIAL_RIGHT: (3.0, 15.0),
    Zone.JAWLINE_LEFT: (5.0, 25.0),
    Zone.JAWLINE_RIGHT: (5.0, 25.0),
    Zone.CHIN: (5.0, 25.0),
    Zone.NECK: (0.5, 5.0),
    Zone.MASSETER_LEFT: (20.0, 80.0),
    Zone.MASSETER_RIGHT: (20.0, 80.0),
}
# Zone.NONE as a plain int, for the zone lists of evaluate_each.
NO_ZONE: Final = int(Zone.NONE)
# A pressure in kPa: one value, or an array of them.
Kpa = TypeVar("Kpa", float, npt.NDArray[np.float64])

# The default hand keeps this fraction of each band's width away from its edges.
BAND_MARGIN_FRACTION: Final = 0.15

# A plausible routine: forehead down to the neck, light around the eyes,
# deep work on the masseters last (domain-safety.md, zones and sequencing).
DEFAULT_ROUTINE: Final[tuple[Zone, ...]] = (
    Zone.FOREHEAD,
    Zone.EYE_AREA_LEFT,
    Zone.EYE_AREA_RIGHT,
    Zone.CHEEK_LEFT,
    Zone.CHEEK_RIGHT,
    Zone.NASOLABIAL_LEFT,
    Zone.NASOLABIAL_RIGHT,
    Zone.JAWLINE_LEFT,
    Zone.JAWLINE_RIGHT,
    Zone.CHIN,
    Zone.NECK,
    Zone.MASSETER_LEFT,
    Zone.MASSETER_RIGHT,
)
# Time per zone: products signal a zone change every 15-30 s (domain-safety.md,
# "handheld devices signal zone changes"); the eye area gets less.
ZONE_DWELL_RANGE_S: Final = (15.0, 30.0)
EYE_DWELL_RANGE_S: Final = (10.0, 20.0)
STROKES_PER_ZONE_RANGE: Final = (2, 4)  # inclusive
LIFT_BETWEEN_STROKES_RANGE_S: Final = (0.3, 1.0)
LIFT_BETWEEN_ZONES_RANGE_S: Final = (1.0, 3.0)
LEAD_IN_RANGE_S: Final = (0.5, 2.0)
REST_AFTER_ROUTINE_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class HandSegment:
    """The head on (or above) one zone for ``duration_s``, pressure ramping linearly."""

    start_s: float
    duration_s: float
    zone: Zone
    pressure_from_kpa: float
    pressure_to_kpa: float | None = None  # None: constant at pressure_from_kpa
    contact: bool = True

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    @property
    def final_pressure_kpa(self) -> float:
        return self.pressure_from_kpa if self.pressure_to_kpa is None else self.pressure_to_kpa


@dataclass(frozen=True, slots=True)
class HandState:
    """The hand at a set of times (arrays of equal length)."""

    pressure_kpa: npt.NDArray[np.float64]
    zone: npt.NDArray[np.uint8]  # Zone.NONE where the script says nothing
    touching: npt.NDArray[np.bool_]


class HandSamples(NamedTuple):
    """The hand at a few times, in plain lists (what ``evaluate_each`` returns)."""

    pressure_kpa: list[float]
    zone: list[int]  # Zone.NONE where the script says nothing
    touching: list[bool]

    @classmethod
    def of(cls, state: HandState) -> HandSamples:
        """The same values as ``state``, in lists."""
        return cls(state.pressure_kpa.tolist(), state.zone.tolist(), state.touching.tolist())


class HandScript:
    """A timeline of hand segments (times in seconds since the device booted)."""

    def __init__(
        self,
        segments: Sequence[HandSegment] = (),
        *,
        noise_floor_kpa: float = DEFAULT_NOISE_FLOOR_KPA,
        noise_fraction: float = DEFAULT_NOISE_FRACTION,
        loop: bool = False,
        period_s: float | None = None,
    ) -> None:
        ordered = sorted(segments, key=lambda s: s.start_s)
        for segment in ordered:
            if segment.duration_s <= 0 or not math.isfinite(segment.duration_s):
                raise ValueError(f"segment duration must be positive and finite: {segment}")
            if segment.pressure_from_kpa < 0 or segment.final_pressure_kpa < 0:
                raise ValueError(f"pressure cannot be negative: {segment}")
        for earlier, later in itertools.pairwise(ordered):
            if later.start_s < earlier.end_s:
                raise ValueError(f"segments overlap: {earlier} and {later}")
        if noise_floor_kpa < 0 or noise_fraction < 0:
            raise ValueError("noise parameters cannot be negative")
        self.segments: tuple[HandSegment, ...] = tuple(ordered)
        self.noise_floor_kpa = noise_floor_kpa
        self.noise_fraction = noise_fraction
        self.loop = loop
        end_s = ordered[-1].end_s if ordered else 0.0
        self.period_s = end_s if period_s is None else period_s
        if loop and self.period_s < end_s:
            raise ValueError(f"period {self.period_s} s is shorter than the script ({end_s} s)")
        self._starts = np.array([s.start_s for s in ordered], dtype=np.float64)
        self._durations = np.array([s.duration_s for s in ordered], dtype=np.float64)
        self._from = np.array([s.pressure_from_kpa for s in ordered], dtype=np.float64)
        self._to = np.array([s.final_pressure_kpa for s in ordered], dtype=np.float64)
        self._zones = np.array([int(s.zone) for s in ordered], dtype=np.uint8)
        self._contact = np.array([s.contact for s in ordered], dtype=np.bool_)
        # The same values as plain floats and ints, for evaluate_each.
        self._start_list: list[float] = self._starts.tolist()
        self._rows: list[tuple[float, float, float, float, int, bool]] = list(
            zip(
                self._start_list,
                self._durations.tolist(),
                self._from.tolist(),
                self._to.tolist(),
                self._zones.tolist(),
                self._contact.tolist(),
                strict=True,
            )
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def idle(cls) -> HandScript:
        """Nobody holds the device."""
        return cls(())

    @classmethod
    def constant(
        cls, zone: Zone, pressure_kpa: float, *, start_s: float = 0.0, duration_s: float = 1e9
    ) -> HandScript:
        """One steady press on one zone."""
        return cls((HandSegment(start_s, duration_s, zone, pressure_kpa),))

    @classmethod
    def default(cls, seed: int) -> HandScript:
        """A plausible session from ``seed``: the routine zones, strokes inside their bands."""
        rng = np.random.default_rng(seed)
        segments: list[HandSegment] = []
        t_s = float(rng.uniform(*LEAD_IN_RANGE_S))
        for zone in DEFAULT_ROUTINE:
            eye = zone in (Zone.EYE_AREA_LEFT, Zone.EYE_AREA_RIGHT)
            dwell_s = float(rng.uniform(*(EYE_DWELL_RANGE_S if eye else ZONE_DWELL_RANGE_S)))
            strokes = int(rng.integers(STROKES_PER_ZONE_RANGE[0], STROKES_PER_ZONE_RANGE[1] + 1))
            low_kpa, high_kpa = ZONE_PRESSURE_BANDS_KPA[zone]
            margin_kpa = (high_kpa - low_kpa) * BAND_MARGIN_FRACTION
            stroke_s = dwell_s / strokes
            for _ in range(strokes):
                start_kpa, end_kpa = rng.uniform(low_kpa + margin_kpa, high_kpa - margin_kpa, 2)
                segments.append(HandSegment(t_s, stroke_s, zone, float(start_kpa), float(end_kpa)))
                t_s += stroke_s + float(rng.uniform(*LIFT_BETWEEN_STROKES_RANGE_S))
            t_s += float(rng.uniform(*LIFT_BETWEEN_ZONES_RANGE_S))
        return cls(segments, loop=True, period_s=t_s + REST_AFTER_ROUTINE_S)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, times_s: npt.NDArray[np.float64]) -> HandState:
        """True pressure, scripted zone and touching flag at each time."""
        times = np.asarray(times_s, dtype=np.float64)
        count = times.shape[0]
        if not self.segments:
            return HandState(
                np.zeros(count), np.zeros(count, dtype=np.uint8), np.zeros(count, dtype=np.bool_)
            )
        if self.loop and self.period_s > 0:
            times = np.mod(times, self.period_s)
        index = np.searchsorted(self._starts, times, side="right") - 1
        safe = np.clip(index, 0, None)
        elapsed = times - self._starts[safe]
        inside = (index >= 0) & (elapsed < self._durations[safe])
        fraction = np.clip(elapsed / self._durations[safe], 0.0, 1.0)
        pressure = self._from[safe] + (self._to[safe] - self._from[safe]) * fraction
        touching = inside & self._contact[safe]
        return HandState(
            np.where(touching, pressure, 0.0),
            np.where(inside, self._zones[safe], np.uint8(Zone.NONE)).astype(np.uint8),
            touching,
        )

    def evaluate_each(self, times_s: Sequence[float]) -> HandSamples:
        """:meth:`evaluate` one time after another, on plain floats.

        For a few times (a live tick) this costs less than the numpy calls of
        :meth:`evaluate`; it does the same float operations on the same values, so the
        results are the same.
        """
        count = len(times_s)
        if not self._rows:
            return HandSamples([0.0] * count, [NO_ZONE] * count, [False] * count)
        pressure: list[float] = []
        zone: list[int] = []
        touching: list[bool] = []
        period_s = self.period_s if self.loop and self.period_s > 0 else None
        starts, rows, find = self._start_list, self._rows, bisect.bisect_right
        for t_s in times_s:
            if period_s is not None:
                t_s %= period_s
            index = find(starts, t_s) - 1
            # Before the first segment (index -1) the row is not used.
            start_s, duration_s, from_kpa, to_kpa, segment_zone, contact = rows[index]
            elapsed_s = t_s - start_s
            if index < 0 or elapsed_s >= duration_s:
                pressure.append(0.0)
                zone.append(NO_ZONE)
                touching.append(False)
                continue
            # Inside the segment 0 <= elapsed < duration: the fraction needs no clipping.
            fraction = elapsed_s / duration_s
            pressure.append(from_kpa + (to_kpa - from_kpa) * fraction if contact else 0.0)
            zone.append(segment_zone)
            touching.append(contact)
        return HandSamples(pressure, zone, touching)

    def noise_sigma_kpa(self, pressure_kpa: Kpa) -> Kpa:
        """Standard deviation of the sensor reading around ``pressure_kpa``."""
        return self.noise_floor_kpa + self.noise_fraction * pressure_kpa
