"""Signs that a device is faulty, read from its telemetry. Pure: samples and times in, verdicts out.

- :class:`StuckSensorDetector`: the pressure reading has not changed by a single count for
  ``stuck_after_s`` while the motor runs on the skin. A live load cell never does that: its
  noise floor and the motor's ripple move the raw value many times a second.
- :class:`ActuatorWatch`: the host wants the motor running (it was told to, and
  acknowledged) but the device reports it off for ``grace_s``: a command acknowledged but
  not applied.
- :class:`RestartDetector`: the device's sequence numbers started again (after a reboot or
  a brown-out the ring buffer and the counter are gone).
- :class:`ClockDriftEstimator`: how fast the device's sample clock runs against the host's,
  from a least-squares fit of sample time on host time.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from devicebridge.core.sequencing import unwrap_sequence

# A live sensor changes its raw reading several times a second (noise floor 0.03 kPa is 3
# counts, and the motor shakes the load cell); 3 s of one value is far outside that.
STUCK_SENSOR_S: Final = 3.0
# Commands take a few milliseconds; a motor still off 2 s after it was told to run is not
# going to start.
ACTUATOR_GRACE_S: Final = 2.0
# A reordered or duplicated batch is at most this far behind; further back, the counter restarted.
MAX_REORDER_S: Final = 10.0
# Fit the drift only over this much host time, and report it only beyond the threshold:
# batches reach the host on 100 ms ticks, which blurs shorter windows.
DRIFT_MIN_WINDOW_S: Final = 20.0
DRIFT_REPORT_PPM: Final = 10_000.0  # 1 %
PPM: Final = 1e6


@dataclass(frozen=True, slots=True)
class FaultChecks:
    """Which device-fault checks the massage engine runs, and their thresholds."""

    stuck_sensor_s: float = STUCK_SENSOR_S
    actuator_grace_s: float = ACTUATOR_GRACE_S


class SensorVerdict(enum.Enum):
    OK = "ok"
    STUCK = "stuck"  # became stuck with this sample
    STILL_STUCK = "still_stuck"
    RECOVERED = "recovered"  # the reading moved again


class StuckSensorDetector:
    """Feed every sample's raw pressure and whether the motor runs on the skin."""

    def __init__(self, sample_rate_hz: float, stuck_after_s: float = STUCK_SENSOR_S) -> None:
        if sample_rate_hz <= 0 or stuck_after_s <= 0:
            raise ValueError("sample rate and stuck time must be positive")
        self.threshold_samples = max(2, round(stuck_after_s * sample_rate_hz))
        self.stuck_after_s = stuck_after_s
        self._value: int | None = None
        self._run = 0
        self.stuck = False

    @property
    def value(self) -> int | None:
        """The raw reading the sensor is stuck at (or repeating now)."""
        return self._value

    def update(self, raw: int, motor_on_skin: bool) -> SensorVerdict:
        """The verdict on one sample."""
        return self.feed((raw,), (motor_on_skin,))[1]

    def feed(self, raw: Sequence[int], motor_on_skin: Sequence[bool]) -> tuple[int, SensorVerdict]:
        """Samples in order, up to the first whose verdict is not OK (that one included).

        Returns how many samples it took and the verdict on the last (OK when all were).
        While stuck, a sample with the stuck reading is STILL_STUCK; one with another
        reading is RECOVERED and starts a new run. Otherwise a sample with the motor on the
        skin and a nonzero reading continues the run of its reading (or starts one), any
        other sample ends the run, and the sample on which a run reaches
        ``threshold_samples`` is STUCK.
        """
        if self.stuck:
            reading = raw[0]
            if reading != self._value:
                self.stuck = False
                self._value, self._run = reading, 1
                return 1, SensorVerdict.RECOVERED
            return 1, SensorVerdict.STILL_STUCK
        value, run, threshold = self._value, self._run, self.threshold_samples
        count = len(raw)
        if count and run + count < threshold and len(motor_on_skin) == count:
            # No run can reach the threshold within these samples: all are OK, and only the
            # run they end on is kept, counted from the last sample back.
            last = raw[-1]
            if not motor_on_skin[-1] or last == 0:
                self._value, self._run = None, 0
                return count, SensorVerdict.OK
            tail = 1
            while tail < count and raw[-1 - tail] == last and motor_on_skin[-1 - tail]:
                tail += 1
            self._value = last
            self._run = tail + run if tail == count and last == value else tail
            return count, SensorVerdict.OK
        taken = 0
        for reading, active in zip(raw, motor_on_skin, strict=True):
            taken += 1
            if not active or reading == 0:
                # Off the skin (or a motor at rest) a steady reading is normal.
                value, run = None, 0
            elif reading == value:
                run += 1
                if run >= threshold:
                    self._value, self._run, self.stuck = value, run, True
                    return taken, SensorVerdict.STUCK
            else:
                value, run = reading, 1  # never STUCK: threshold_samples is at least 2
        self._value, self._run = value, run
        return taken, SensorVerdict.OK


class ActuatorWatch:
    """Reports once when the motor stays off for ``grace_s`` while it should run."""

    def __init__(self, sample_rate_hz: float, grace_s: float = ACTUATOR_GRACE_S) -> None:
        self.grace_samples = max(1, round(grace_s * sample_rate_hz))
        self.grace_s = grace_s
        self._mismatch = 0
        self.reported = False
        # The first sample from which the motor counts as commanded on (None: it is not);
        # from the start unless told otherwise, so that a replay is judged on the samples.
        self.commanded_from: int | None = 0

    def commanded(self, sequence: int) -> bool:
        """Whether the motor was commanded on when sample ``sequence`` was taken."""
        commanded_from = self.commanded_from
        return commanded_from is not None and sequence >= commanded_from

    def update(self, wanted_on: bool, motor_on: bool) -> bool:
        """Whether this sample reports."""
        return self.feed(wanted_on, (motor_on,))[1]

    def feed(self, wanted_on: bool, motor_on: Sequence[bool]) -> tuple[int, bool]:
        """Samples in order, all wanted on or all not, up to the first that reports.

        Returns how many samples it took and whether the last reported. A sample with the
        motor wanted on and reported off is one more of a run of them; any other ends it;
        the first sample on which such a run reaches ``grace_samples`` reports, once.
        """
        if not wanted_on or False not in motor_on:
            self._mismatch = 0
            return len(motor_on), False
        mismatch, grace, reported = self._mismatch, self.grace_samples, self.reported
        taken = 0
        for on in motor_on:
            taken += 1
            if on:
                mismatch = 0
            else:
                mismatch += 1
                if mismatch >= grace and not reported:
                    self._mismatch, self.reported = mismatch, True
                    return taken, True
        self._mismatch = mismatch
        return taken, False


class RestartDetector:
    """Tells a restarted device counter from loss, duplication and reordering."""

    def __init__(self, sample_rate_hz: float | None = None) -> None:
        self._rate_hz = sample_rate_hz
        self._after_reset = False

    def set_sample_rate(self, sample_rate_hz: float) -> None:
        self._rate_hz = sample_rate_hz

    def on_link_reset(self) -> None:
        """The link went down; the device streams from its current counter when it is back."""
        self._after_reset = True

    def restarted(self, raw_first_sequence: int, next_expected: int | None) -> bool:
        """Whether a live batch starting at ``raw_first_sequence`` comes from a restarted counter.

        After a reconnection the device streams from where its counter is, never from
        before what it already sent: a batch behind the expected sequence means the
        counter restarted. Otherwise only a jump further back than any reordering is.
        """
        after_reset, self._after_reset = self._after_reset, False
        if next_expected is None:
            return False
        first = unwrap_sequence(raw_first_sequence, next_expected)
        if after_reset and first < next_expected:
            return True
        if self._rate_hz is None:
            return False
        return next_expected - first > MAX_REORDER_S * self._rate_hz


class ClockDriftEstimator:
    """Least-squares slope of device sample time against host time, as parts per million."""

    def __init__(self, sample_rate_hz: float) -> None:
        self._rate_hz = sample_rate_hz
        self._origin: tuple[float, int] | None = None
        self._n = 0
        self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._span_s = 0.0

    def feed(self, host_s: float, end_sequence: int) -> None:
        """A live batch whose last sample (exclusive end ``end_sequence``) arrived at ``host_s``."""
        origin = self._origin
        if origin is None:
            origin = self._origin = (host_s, end_sequence)
        x = host_s - origin[0]
        y = (end_sequence - origin[1]) / self._rate_hz
        self._n += 1
        self._sx += x
        self._sy += y
        self._sxx += x * x
        self._sxy += x * y
        if x > self._span_s:  # max(), without the call
            self._span_s = x

    @property
    def drift_ppm(self) -> float | None:
        """How much faster (+) or slower (-) the device clock runs; ``None`` until enough data."""
        if self._n < 2 or self._span_s < DRIFT_MIN_WINDOW_S:
            return None
        denominator = self._n * self._sxx - self._sx * self._sx
        if denominator <= 0:
            return None
        slope = (self._n * self._sxy - self._sx * self._sy) / denominator
        return (slope - 1.0) * PPM

    @property
    def significant(self) -> bool:
        drift = self.drift_ppm
        return drift is not None and abs(drift) >= DRIFT_REPORT_PPM
