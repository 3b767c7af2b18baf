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
from typing import Final, NamedTuple, Protocol, TypeVar, overload

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
# Zone.NONE as a plain int.
NO_ZONE: Final = int(Zone.NONE)
# A pressure in kPa: one value, or an array of them.
Kpa = TypeVar("Kpa", float, npt.NDArray[np.float64])
# A value, or an array of them (one per hand, per time).
FloatValues = float | npt.NDArray[np.float64]

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
    """The hand at a few times, in plain lists (what ``evaluate_each`` returns): the values
    of :class:`HandState`, element by element."""

    pressure_kpa: list[float]
    zone: list[int]  # Zone.NONE where the script says nothing
    touching: list[bool]


class Hand(Protocol):
    """What holds a massager: the true load over time, and its sensor's noise parameters.

    A hand type may offer ``evaluate_many(hands, times_s)`` (a classmethod): the hands of a
    fleet at once, in ``(hands, times)`` arrays (see :func:`evaluate_hands`).
    """

    noise_floor_kpa: float
    noise_fraction: float

    def evaluate(self, times_s: npt.NDArray[np.float64]) -> HandState: ...

    def evaluate_each(self, times_s: Sequence[float]) -> HandSamples:
        """:meth:`evaluate` at a few times (a live tick) in plain floats, which costs less
        there than numpy calls; the same values."""
        ...

    def noise_sigma_kpa(self, pressure_kpa: Kpa) -> Kpa: ...


@overload
def noise_sigma_kpa(floor_kpa: float, fraction: float, pressure_kpa: float) -> float: ...  # type: ignore[overload-overlap]


@overload
def noise_sigma_kpa(
    floor_kpa: FloatValues, fraction: FloatValues, pressure_kpa: FloatValues
) -> npt.NDArray[np.float64]: ...


def noise_sigma_kpa(
    floor_kpa: FloatValues, fraction: FloatValues, pressure_kpa: FloatValues
) -> FloatValues:
    """Standard deviation of the sensor reading around ``pressure_kpa``: a floor from the
    ADC plus a part proportional to the load (floats, or arrays with a value per hand)."""
    return floor_kpa + fraction * pressure_kpa


def evaluate_hands(hands: Sequence[Hand], times_s: npt.NDArray[np.float64]) -> HandState:
    """Every hand at the same times, in arrays of shape ``(len(hands), len(times_s))``.

    The hands of a type with ``evaluate_many`` are worked out together, any other one on
    its own (:meth:`Hand.evaluate`).
    """
    if len(hands) == 1:
        many = getattr(type(hands[0]), "evaluate_many", None)
        if many is not None:
            one: HandState = many(hands, times_s)
            return one
    count = int(times_s.shape[0])
    kinds: dict[type, list[int]] = {}
    for position, hand in enumerate(hands):
        kinds.setdefault(type(hand), []).append(position)
    if len(kinds) == 1:
        many = getattr(type(hands[0]), "evaluate_many", None)
        if many is not None:
            state: HandState = many(hands, times_s)
            return state
    pressure = np.empty((len(hands), count), dtype=np.float64)
    zone = np.empty((len(hands), count), dtype=np.uint8)
    touching = np.empty((len(hands), count), dtype=np.bool_)
    for kind, positions in kinds.items():
        many = getattr(kind, "evaluate_many", None)
        if many is not None:
            part: HandState = many([hands[p] for p in positions], times_s)
            pressure[positions] = part.pressure_kpa
            zone[positions] = part.zone
            touching[positions] = part.touching
            continue
        for p in positions:
            one = hands[p].evaluate(times_s)
            pressure[p], zone[p], touching[p] = one.pressure_kpa, one.zone, one.touching
    return HandState(pressure, zone, touching)


class _SegmentTable(NamedTuple):
    """The segments of several hand scripts, a row each, padded to the longest (a padding
    start is +inf, so no time reaches it)."""

    starts: npt.NDArray[np.float64]
    durations: npt.NDArray[np.float64]
    from_kpa: npt.NDArray[np.float64]
    to_kpa: npt.NDArray[np.float64]
    zones: npt.NDArray[np.uint8]
    contact: npt.NDArray[np.bool_]
    looped: npt.NDArray[np.bool_]  # (hands, 1)
    period_s: npt.NDArray[np.float64]  # (hands, 1); 1.0 where not looped
    any_looped: bool
    rows: npt.NDArray[np.intp]  # (hands, 1): each row's index, for fancy indexing

    def row(self, row: int) -> _SegmentTable:
        """One script's row, its columns in one dimension."""
        return self._replace(
            starts=self.starts[row],
            durations=self.durations[row],
            from_kpa=self.from_kpa[row],
            to_kpa=self.to_kpa[row],
            zones=self.zones[row],
            contact=self.contact[row],
        )

    @classmethod
    def of(cls, hands: Sequence[HandScript]) -> _SegmentTable:
        width = max(1, *(len(h.segments) for h in hands))
        shape = (len(hands), width)
        starts = np.full(shape, np.inf)
        durations = np.ones(shape)
        from_kpa = np.zeros(shape)
        to_kpa = np.zeros(shape)
        zones = np.zeros(shape, dtype=np.uint8)
        contact = np.zeros(shape, dtype=np.bool_)
        for row, hand in enumerate(hands):
            used = len(hand.segments)
            starts[row, :used] = [s.start_s for s in hand.segments]
            durations[row, :used] = [s.duration_s for s in hand.segments]
            from_kpa[row, :used] = [s.pressure_from_kpa for s in hand.segments]
            to_kpa[row, :used] = [s.final_pressure_kpa for s in hand.segments]
            zones[row, :used] = [int(s.zone) for s in hand.segments]
            contact[row, :used] = [s.contact for s in hand.segments]
        looped = np.array([[h.loop and h.period_s > 0] for h in hands], dtype=np.bool_)
        period_s = np.array([[h.period_s if h.loop and h.period_s > 0 else 1.0] for h in hands])
        return cls(
            starts,
            durations,
            from_kpa,
            to_kpa,
            zones,
            contact,
            looped,
            period_s,
            bool(looped.any()),
            np.arange(len(hands))[:, None],
        )


def segment_pressure_kpa(from_kpa: Kpa, to_kpa: Kpa, fraction: Kpa) -> Kpa:
    """The pressure ``fraction`` of the way through a segment ramping from ``from_kpa`` to
    ``to_kpa`` (floats, or arrays)."""
    return from_kpa + (to_kpa - from_kpa) * fraction


def _segment_values(
    table: _SegmentTable,
    times: npt.NDArray[np.float64],
    index: npt.NDArray[np.intp],
    safe: npt.NDArray[np.intp] | tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]],
) -> HandState:
    """The hand at ``times`` (since the script's start, looped) that fall in the segments
    ``index`` (-1: before the first), which ``safe`` picks from the table's columns."""
    durations = table.durations[safe]
    from_kpa = table.from_kpa[safe]
    elapsed = times - table.starts[safe]
    inside = (index >= 0) & (elapsed < durations)
    # The method np.clip calls, without its Python wrapper.
    fraction = (elapsed / durations).clip(0.0, 1.0)
    pressure = segment_pressure_kpa(from_kpa, table.to_kpa[safe], fraction)
    touching = inside & table.contact[safe]
    return HandState(
        np.where(touching, pressure, 0.0),
        np.where(inside, table.zones[safe], np.uint8(Zone.NONE)),
        touching,
    )


# evaluate_many compares every time with every segment start at once up to this many
# comparisons; beyond (long blocks) it looks the times up a hand at a time.
_BROADCAST_LOOKUP_LIMIT: Final = 1 << 16
# Segment tables of recent fleets, by the identities of their hands, which are kept here
# with them (so an identity is not reused while its entry lasts).
_TABLES: dict[tuple[int, ...], tuple[tuple[HandScript, ...], _SegmentTable]] = {}
_TABLES_LIMIT: Final = 64


def _segment_table(hands: Sequence[HandScript]) -> _SegmentTable:
    key = tuple(map(id, hands))
    cached = _TABLES.get(key)
    if cached is not None:
        return cached[1]
    if len(_TABLES) >= _TABLES_LIMIT:
        _TABLES.clear()
    table = _SegmentTable.of(hands)
    if len(hands) == 1:
        table = table.row(0)  # what evaluate_many uses for one script
    _TABLES[key] = (tuple(hands), table)
    return table


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
        # The segments as plain floats and ints, for evaluate_each.
        self._start_list = [s.start_s for s in ordered]
        self._rows = [
            (
                s.start_s,
                s.duration_s,
                s.pressure_from_kpa,
                s.final_pressure_kpa,
                int(s.zone),
                s.contact,
            )
            for s in ordered
        ]

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
        state = self.evaluate_many((self,), np.asarray(times_s, dtype=np.float64))
        return HandState(state.pressure_kpa[0], state.zone[0], state.touching[0])

    @classmethod
    def evaluate_many(
        cls, hands: Sequence[HandScript], times_s: npt.NDArray[np.float64]
    ) -> HandState:
        """Every script at the same times, in ``(hands, times)`` arrays: a row each."""
        table = _segment_table(hands)
        times = np.asarray(times_s, dtype=np.float64)
        if len(hands) == 1:
            # One script: its own row, in one dimension (the same values, for less).
            if table.any_looped:
                times = np.mod(times, table.period_s[0, 0])
            index = np.searchsorted(table.starts, times, side="right") - 1
            row = _segment_values(table, times, index, np.maximum(index, 0))
            return HandState(row.pressure_kpa[None, :], row.zone[None, :], row.touching[None, :])
        times = times[None, :]
        if table.any_looped:
            times = np.where(table.looped, np.mod(times, table.period_s), times)
        # The segment a time falls in: how many starts are at or before it, minus one.
        if len(hands) * times_s.shape[0] * table.starts.shape[1] <= _BROADCAST_LOOKUP_LIMIT:
            index = np.count_nonzero(table.starts[:, None, :] <= times[:, :, None], axis=2) - 1
        else:
            rows = np.broadcast_to(times, (len(hands), times_s.shape[0]))
            index = (
                np.stack(
                    [
                        np.searchsorted(starts, row, side="right")
                        for starts, row in zip(table.starts, rows, strict=True)
                    ]
                )
                - 1
            )
        return _segment_values(table, times, index, (table.rows, np.maximum(index, 0)))

    def evaluate_each(self, times_s: Sequence[float]) -> HandSamples:
        """:meth:`evaluate` one time after another, on plain floats: the segment found with
        bisect instead of numpy's search, the pressure with :func:`segment_pressure_kpa`."""
        count = len(times_s)
        if not self.segments:
            return HandSamples([0.0] * count, [NO_ZONE] * count, [False] * count)
        rows = self._rows
        starts = self._start_list
        period_s = self.period_s if self.loop and self.period_s > 0 else None
        pressure: list[float] = []
        zone: list[int] = []
        touching: list[bool] = []
        for t_s in times_s:
            if period_s is not None:
                t_s %= period_s
            index = bisect.bisect_right(starts, t_s) - 1
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
            pressure.append(segment_pressure_kpa(from_kpa, to_kpa, fraction) if contact else 0.0)
            zone.append(segment_zone)
            touching.append(contact)
        return HandSamples(pressure, zone, touching)

    def noise_sigma_kpa(self, pressure_kpa: Kpa) -> Kpa:
        """Standard deviation of the sensor reading around ``pressure_kpa``."""
        return noise_sigma_kpa(self.noise_floor_kpa, self.noise_fraction, pressure_kpa)
