"""A handheld facial massager: motor, pressure sensor, contact detection, zones, buttons."""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, TypeVar, Unpack, overload

import numpy as np
import numpy.typing as npt

from protocols import (
    Capability,
    CommandBody,
    DeviceKind,
    EventCode,
    MassageMode,
    MassageProgramStep,
    Opcode,
    Program,
    ProgramEndReason,
    ResultCode,
    SampleFormat,
    SetIntensity,
    SetMode,
    SetZone,
    ShutdownReason,
    Zone,
)
from protocols.constants import MAX_INTENSITY_LEVEL
from protocols.telemetry import (
    MASSAGER_FLAG_CONTACT,
    MASSAGER_FLAG_MOTOR_ON,
    MASSAGER_FLAG_PROGRAM_RUNNING,
    MASSAGER_SAMPLE_DTYPE,
    PRESSURE_KPA_PER_UNIT,
    TEMPERATURE_C_PER_UNIT,
)
from simulators.clock import VirtualClock
from simulators.devices.device import (
    Button,
    DeviceOptions,
    Press,
    RandomStream,
    SimulatedDevice,
    derived_seed,
    quiet_charges,
)
from simulators.devices.hand import (
    NO_ZONE,
    FloatValues,
    Hand,
    HandScript,
    HandState,
    evaluate_hands,
    noise_sigma_kpa,
)
from simulators.devices.program_runner import PROGRAM_END_OF_SHUTDOWN, MassagerProgramRun
from simulators.devices.skin import AMBIENT_C, SKIN_BASELINE_C, SKIN_BASELINE_SPREAD_C

if TYPE_CHECKING:
    from simulators.devices.fleet import MassagerFleet

MASSAGER_SAMPLE_RATE_HZ: Final = 100
# Contact detection with hysteresis, so sensor noise at the threshold does not
# chatter CONTACT_CHANGED events. Below the lightest eye-area band (0.5 kPa).
CONTACT_ON_KPA: Final = 0.3
CONTACT_OFF_KPA: Final = 0.15
# Full scale of the u16 pressure field in 0.01 kPa.
SENSOR_MAX_KPA: Final = 0xFFFF * PRESSURE_KPA_PER_UNIT
# The motor shakes the load cell: extra noise per intensity level while touching.
MOTOR_RIPPLE_KPA_PER_LEVEL: Final = 0.02
# The head's sensor follows skin or air with this first-order time constant.
SENSOR_THERMAL_TAU_S: Final = 20.0
TEMPERATURE_NOISE_C: Final = 0.02
# Battery: about two days in standby, 75 minutes of motor at full intensity.
STANDBY_LIFE_S: Final = 48 * 3600
MOTOR_LIFE_AT_MAX_S: Final = 75 * 60
IDLE_DRAIN_PERCENT_PER_S: Final = 100.0 / STANDBY_LIFE_S
MOTOR_DRAIN_PERCENT_PER_S_PER_LEVEL: Final = 100.0 / (MOTOR_LIFE_AT_MAX_S * MAX_INTENSITY_LEVEL)
# The level a short press of the power button starts at (firmware default).
DEFAULT_BUTTON_INTENSITY: Final = 3
# _sensor_normals draws this many standard normals at a time (5 s of samples at 100 Hz).
NORMALS_AHEAD: Final = 1500
# The sample fields that _generate keeps as runs of equal values.
_RUN_FIELDS: Final = ("battery_percent", "zone", "intensity", "mode", "flags")
# A massager sample with only the run fields set: pressure and temperature (zero bytes
# here, _generate sets them) come first, then _RUN_FIELDS, one byte each. _Runs.samples
# builds blocks from it when the sample layout is that one (checked here).
_RUN_SAMPLE: Final = struct.Struct("<4x5B")
_RUN_SAMPLE_FIELDS: Final[Mapping[str, tuple[Any, ...]]] = MASSAGER_SAMPLE_DTYPE.fields or {}
_RUN_SAMPLE_LAYOUT: Final = (
    MASSAGER_SAMPLE_DTYPE.itemsize == _RUN_SAMPLE.size
    and MASSAGER_SAMPLE_DTYPE.names == ("pressure_dapa", "skin_temperature_centi_c", *_RUN_FIELDS)
    and all(
        _RUN_SAMPLE_FIELDS[name][:2] == (np.dtype(np.uint8), 4 + index)
        for index, name in enumerate(_RUN_FIELDS)
    )
)
# One device's blocks shorter than this are worked out in plain floats (a live tick).
EACH_MAX_SAMPLES: Final = 48
# From this many devices on, generate_massagers takes the quiet ones together; from this
# many quiet ones on, their sensors' temperatures are worked out in arrays.
FLEET_MIN_DEVICES: Final = 3
FLEET_LAG_MIN_DEVICES: Final = 8
MODE_CYCLE: Final = (MassageMode.VIBRATION, MassageMode.PERCUSSION, MassageMode.PULSE)


class SimulatedMassager(SimulatedDevice):
    """Intensity 0..10 and a mode; the motor runs when intensity > 0 and mode is not OFF."""

    kind: ClassVar[DeviceKind] = DeviceKind.MASSAGER
    sample_format: ClassVar[SampleFormat] = SampleFormat.MASSAGER_V1
    model_number: ClassVar[str] = "OFC-FM1"
    serial_prefix: ClassVar[str] = "FM"
    name_prefix: ClassVar[str] = "FaceMassager"
    capabilities: ClassVar[Capability] = (
        Capability.PRESSURE_SENSOR
        | Capability.VIBRATION
        | Capability.PERCUSSION
        | Capability.CONTACT_SENSOR
        | Capability.SKIN_TEMPERATURE
        | Capability.BUTTONS
        | Capability.BACKFILL
        | Capability.PROGRAM_TRANSFER
    )
    default_sample_rate_hz: ClassVar[int] = MASSAGER_SAMPLE_RATE_HZ
    kind_opcodes: ClassVar[frozenset[Opcode]] = frozenset(
        {Opcode.SET_INTENSITY, Opcode.SET_MODE, Opcode.SET_ZONE}
    )

    def __init__(
        self,
        clock: VirtualClock,
        *,
        hand: Hand | None = None,
        **options: Unpack[DeviceOptions],
    ) -> None:
        super().__init__(clock, **options)
        self.hand: Hand = (
            hand
            if hand is not None
            else HandScript.default(derived_seed(self.seed, self.index, RandomStream.HAND))
        )
        self.intensity = 0
        self.mode = MassageMode.OFF
        self.zone = Zone.NONE
        self.contact = False
        self._last_hand_zone = int(Zone.NONE)
        self._last_on_intensity = DEFAULT_BUTTON_INTENSITY
        self._last_on_mode = MassageMode.VIBRATION
        spread_c = float(self.sensor_rng.uniform(-1.0, 1.0)) * SKIN_BASELINE_SPREAD_C / 2
        self.skin_baseline_c = SKIN_BASELINE_C + spread_c
        self.sensor_temperature_c = AMBIENT_C
        self._program_run: MassagerProgramRun | None = None
        # Standard normals drawn ahead from sensor_rng (see _sensor_normals).
        self._normals_rng = self.sensor_rng
        self._normals: npt.NDArray[np.float64] = np.empty(0)
        self._normals_used = 0
        # The fleet this device takes its samples with at its ticks (None: on its own).
        self.fleet: MassagerFleet | None = None

    @property
    def motor_on(self) -> bool:
        return self.intensity > 0 and self.mode != MassageMode.OFF

    @property
    def busy(self) -> bool:
        return self.motor_on or self.program_running

    @property
    def program_running(self) -> bool:
        return self._program_run is not None

    @property
    def program_run(self) -> MassagerProgramRun | None:
        """The program running now (for tests: its step index and counters)."""
        return self._program_run

    # ------------------------------------------------------------------ programs

    def _start_program(self, program: Program) -> ResultCode:
        run = MassagerProgramRun(
            program, self.sample_rate_hz, self._emit, self.uptime_s, self._apply_program_step
        )
        self._program_run = run
        run.begin(self.uptime_s)
        return ResultCode.OK

    def _apply_program_step(self, step: MassageProgramStep | None, t_s: float) -> None:
        """The program drives the motor: the step's settings, or off (``None``)."""
        if step is None:
            self.intensity = 0
            return
        self._set_zone(step.zone, t_s)
        self.mode = step.mode
        self.intensity = step.intensity

    def _stop_program(self, reason: ProgramEndReason) -> None:
        run = self._program_run
        if run is not None:
            # PROGRAM_FINISHED goes out while the program still counts as running, so a
            # host that is away gets it from the event backlog.
            run.stop(reason, self.uptime_s)
            self._program_run = None
        self._stop_all_actuators()

    # ------------------------------------------------------------------ commands

    def _execute_kind(self, body: CommandBody) -> tuple[ResultCode, bytes]:
        if self.program_running:
            return ResultCode.BUSY, b""  # the program drives the motor until it ends
        match body:
            case SetIntensity(level=level):
                self.intensity = level
                return ResultCode.OK, b""
            case SetMode(mode=mode):
                if not isinstance(mode, MassageMode):
                    return ResultCode.INVALID_PARAMETER, b""
                self.mode = mode
                return ResultCode.OK, b""
            case SetZone(zone=zone):
                if not isinstance(zone, Zone):
                    return ResultCode.INVALID_PARAMETER, b""
                self._set_zone(zone, None)
                return ResultCode.OK, b""
            case _:
                return ResultCode.NOT_SUPPORTED, b""

    def _stop_all(self) -> None:
        self._stop_program(ProgramEndReason.STOPPED_BY_HOST)

    def _stop_all_actuators(self) -> None:
        self.intensity = 0
        self.mode = MassageMode.OFF

    def _set_zone(self, zone: Zone, t_s: float | None) -> None:
        if zone != self.zone:
            self.zone = zone
            self._emit(EventCode.ZONE_CHANGED, bytes([zone]), t_s)

    # ------------------------------------------------------------------ buttons

    def press_power(self, long_press: bool = False) -> None:
        """The power button: short starts the motor or steps intensity up; long stops it."""
        if not self.is_powered:
            return
        self.catch_up()
        self._emit(
            EventCode.BUTTON, bytes([Button.POWER, Press.LONG if long_press else Press.SHORT])
        )
        if self.program_running:
            # Any press of the power button is the user's stop for a running program.
            self._stop_program(ProgramEndReason.BUTTON)
            return
        if long_press:
            if self.motor_on:
                self._last_on_intensity, self._last_on_mode = self.intensity, self.mode
            self._stop_all_actuators()
        elif not self.motor_on:
            self.intensity = self._last_on_intensity
            self.mode = self._last_on_mode
        else:
            # Steps wrap from the top level back to 1, as on most handhelds.
            self.intensity = self.intensity % MAX_INTENSITY_LEVEL + 1

    def press_mode(self) -> None:
        """The mode button: cycles vibration -> percussion -> pulse (motor state unchanged)."""
        if not self.is_powered:
            return
        self.catch_up()
        self._emit(EventCode.BUTTON, bytes([Button.MODE, Press.SHORT]))
        if self.program_running:
            return  # the program sets the mode per step
        if self.mode in MODE_CYCLE:
            self.mode = MODE_CYCLE[(MODE_CYCLE.index(self.mode) + 1) % len(MODE_CYCLE)]
        else:
            self.mode = MODE_CYCLE[0]
        self._last_on_mode = self.mode

    # ------------------------------------------------------------------ sampling

    def _sensor_normals(self, count: int) -> npt.NDArray[np.float64]:
        """The next ``count`` standard normal draws of ``sensor_rng`` (a read-only view).

        Drawn ahead, ``NORMALS_AHEAD`` at a time: one draw of many gives the numbers of
        many draws of few, in order (nothing else draws from ``sensor_rng`` once the
        device is built), and a draw per live tick costs far more than its numbers.
        """
        normals, used = self._normals, self._normals_used
        if self._normals_rng is not self.sensor_rng:
            # Someone gave the device another generator: draw from that one from here on.
            self._normals_rng = self.sensor_rng
            normals, used = np.empty(0), 0
        if used + count > normals.shape[0]:
            fresh = self.sensor_rng.standard_normal(max(count, NORMALS_AHEAD))
            normals, used = np.concatenate((normals[used:], fresh)), 0
            normals.flags.writeable = False
            self._normals = normals
        self._normals_used = used + count
        return normals[used : used + count]

    async def _run(self) -> None:
        fleet = self.fleet
        if fleet is None:
            await super()._run()
        else:
            await fleet.sample(self)

    def _generate(self, times_s: npt.NDArray[np.float64]) -> npt.NDArray[np.void]:
        # A device on its own is a fleet of one: the one definition of the samples.
        return generate_massagers((self,), times_s)[0]

    def _read_each(self, times_s: npt.NDArray[np.float64]) -> _Row:
        """What the sensor reads over a few samples, in plain lists: the hand's
        ``evaluate_each`` and :func:`sensor_reading_kpa` on floats (see :class:`_Row`)."""
        count = int(times_s.shape[0])
        noise = self._sensor_normals(3 * count)
        times = times_s.tolist()
        hand = self.hand.evaluate_each(times)
        values = noise[: 2 * count].tolist()
        pressure_noise, ripple_noise = values[:count], values[count:]
        ripple_kpa = self._motor_state()[1]
        noise_sigma = self.hand.noise_sigma_kpa
        pressure_kpa: list[float] = []
        # The hand mostly holds one pressure over a tick: its noise sigma is worked out once
        # per value (a function of the pressure alone).
        sigma_of_kpa: float | None = None
        sigma_kpa = 0.0
        for true_kpa, load, ripple, on in zip(
            hand.pressure_kpa, pressure_noise, ripple_noise, hand.touching, strict=True
        ):
            if true_kpa != sigma_of_kpa:
                sigma_of_kpa, sigma_kpa = true_kpa, noise_sigma(true_kpa)
            pressure_kpa.append(
                sensor_reading_kpa(true_kpa, sigma_kpa, load, ripple, ripple_kpa, on)
            )
        return _Row(
            times,
            hand.pressure_kpa,
            hand.zone,
            hand.touching,
            pressure_noise,
            ripple_noise,
            noise[2 * count :] * TEMPERATURE_NOISE_C,
            pressure_kpa,
        )

    def _thermal_alpha(self) -> float:
        """The weight of one sample's first-order step of the head's sensor (see
        :func:`thermal_lag`)."""
        period_s = 1.0 / self.sample_rate_hz
        return 1.0 - math.exp(-period_s / SENSOR_THERMAL_TAU_S)

    def _react(self, row: _Row) -> npt.NDArray[np.void]:
        """The firmware going through the readings ``row`` sample by sample, where
        something happens that it must react to: the hand reaching another zone, contact
        going on or off (with hysteresis), a running program, the battery. Runs between
        those are taken at once, as :func:`generate_massagers` takes a quiet block."""
        times_s, hand_kpa, hand_zones, touching, pressure_noise, ripple_noise = row[:6]
        temperature_noise = row.temperature_noise
        pressure_kpa = row.pressure_kpa  # the device's own: reworked in place below
        count = len(times_s)
        # Commands and buttons take the samples due before they act, so the motor holds
        # its state over a block, except when a running program switches it mid-block:
        # then the pressure of the following samples is worked out again, one by one.
        motor_on, ripple_kpa, drain_percent = self._motor_state()
        block_ripple_kpa = ripple_kpa
        noise_sigma = self.hand.noise_sigma_kpa
        # The sensor's first-order lag and the contact state, kept in locals over the block.
        sensor_c = self.sensor_temperature_c
        contact = self.contact
        target_c = self.skin_baseline_c if contact else AMBIENT_C
        # Arrays (a block), or lists (a live tick of one device, see _read_each).
        bulk = isinstance(pressure_kpa, np.ndarray)
        if bulk:
            # Sorted sample positions, as lists for bisect (see _next_at).
            zone_events = self._hand_zone_events(np.asarray(hand_zones)).tolist()
            crossings = _ContactCrossings(np.asarray(pressure_kpa))
            quiet_block = False
        else:
            # A few samples: the quiet way below takes the whole block or none of it.
            quiet_block = (
                self._program_run is None
                and _no_zone_event(hand_zones, self._last_hand_zone)  # type: ignore[arg-type]
                and _no_contact_change(pressure_kpa, contact)  # type: ignore[arg-type]
            )
        thermal_alpha = self._thermal_alpha()

        temperatures: list[float] = []
        # Every other field changes only when something happens: kept as runs.
        runs = _Runs()
        changed = True  # the run values of this sample must be worked out again
        # Draining reports nothing while the charge stays above this floor.
        battery_floor_percent = self._battery_quiet_floor_percent()
        battery_percent = self.battery_percent
        i = 0
        while i < count:
            if (bulk or i == 0) and self._program_run is None and ripple_kpa == block_ripple_kpa:
                if bulk:
                    quiet_end = min(
                        _next_at(zone_events, i, count), crossings.next_switch(contact, i, count)
                    )
                else:
                    quiet_end = count if quiet_block else 0
                quiet = self._drain_battery_quietly(
                    drain_percent, quiet_end - i, battery_floor_percent
                )
                if quiet:
                    runs.add(i, self._run_values(battery_percent, self.zone, contact, motor_on, 0))
                    (next_c,) = thermal_lag(sensor_c, target_c, thermal_alpha, 1)
                    if next_c == sensor_c:
                        # Settled (to the last bit): every step gives the same value again.
                        temperatures += [sensor_c] * quiet
                    else:
                        temperatures += thermal_lag(sensor_c, target_c, thermal_alpha, quiet)
                        sensor_c = temperatures[-1]
                    i += quiet
                    continue
            t_s = float(times_s[i])
            hand_zone = int(hand_zones[i])
            if hand_zone != NO_ZONE and hand_zone != self._last_hand_zone:
                # The hand moved to another zone: that wins over an earlier SET_ZONE.
                self._last_hand_zone = hand_zone
                self._set_zone(Zone(hand_zone), t_s)
                changed = True
            if ripple_kpa != block_ripple_kpa:
                true_kpa = float(hand_kpa[i])
                pressure_kpa[i] = sensor_reading_kpa(
                    true_kpa,
                    noise_sigma(true_kpa),
                    float(pressure_noise[i]),
                    float(ripple_noise[i]),
                    ripple_kpa,
                    bool(touching[i]),
                )
            pressure = float(pressure_kpa[i])
            if pressure < CONTACT_OFF_KPA if contact else pressure >= CONTACT_ON_KPA:
                contact = self.contact = not contact
                self._emit(EventCode.CONTACT_CHANGED, b"\x01" if contact else b"\x00", t_s)
                target_c = self.skin_baseline_c if contact else AMBIENT_C
                changed = True
            (sensor_c,) = thermal_lag(sensor_c, target_c, thermal_alpha, 1)
            # The reading was taken on the zone the device was on before the program
            # (possibly) moves to its next step on this very sample: label it with that one,
            # or the sample that completes a step would count toward the next zone.
            sample_zone = self.zone
            program_flag = 0
            run = self._program_run
            if run is not None:
                # The firmware's control loop sees each reading before it is logged, so
                # a hard-limit stop shows in the very sample that crossed the limit.
                run.on_sample(
                    t_s,
                    round(pressure / PRESSURE_KPA_PER_UNIT),
                    contact,
                    round((sensor_c + float(temperature_noise[i])) / TEMPERATURE_C_PER_UNIT),
                )
                if run.finished:
                    self._program_run = None
                else:
                    program_flag = MASSAGER_FLAG_PROGRAM_RUNNING
                motor_on, ripple_kpa, drain_percent = self._motor_state()
                changed = True
            charge_percent = self._battery_charge_percent - drain_percent
            if charge_percent > battery_floor_percent:
                self._battery_charge_percent = charge_percent  # all _drain_battery does here
            elif not self._drain_battery(drain_percent, t_s):
                count = i
                break
            else:
                battery_floor_percent = self._battery_quiet_floor_percent()
                battery_percent = self.battery_percent
                changed = True
            temperatures.append(sensor_c)
            if changed:
                runs.add(
                    i,
                    self._run_values(battery_percent, sample_zone, contact, motor_on, program_flag),
                )
                # A program may change the next sample's zone, motor or flags.
                changed = run is not None
            i += 1
        self.sensor_temperature_c = sensor_c

        samples = runs.samples(count, self.sample_dtype)
        # np.rint rounds half to even as np.round does, without np.round's Python wrapper.
        samples["pressure_dapa"] = np.rint(np.divide(pressure_kpa[:count], PRESSURE_KPA_PER_UNIT))
        samples["skin_temperature_centi_c"] = np.rint(
            np.add(np.array(temperatures, dtype=np.float64), temperature_noise[:count])
            / TEMPERATURE_C_PER_UNIT
        )
        return samples

    def _run_values(
        self, battery_percent: int, zone: Zone, contact: bool, motor_on: bool, program_flag: int
    ) -> tuple[int, int, int, int, int]:
        """The fields of ``_RUN_FIELDS`` of a sample, in that order."""
        flags = (
            (MASSAGER_FLAG_CONTACT if contact else 0)
            | (MASSAGER_FLAG_MOTOR_ON if motor_on else 0)
            | program_flag
        )
        return battery_percent, int(zone), self.intensity, int(self.mode), flags

    def _hand_zone_events(self, hand_zones: npt.NDArray[np.uint8]) -> npt.NDArray[np.intp]:
        """Samples where the hand reaches a zone other than the last one it was on."""
        # logical_or.reduce is what .any() runs, without its Python wrapper.
        if not np.logical_or.reduce(hand_zones != self._last_hand_zone):
            # Still on the last zone (or, when that is Zone.NONE, away all along).
            return np.empty(0, dtype=np.intp)
        touched = np.flatnonzero(hand_zones != Zone.NONE)
        if touched.shape[0] == 0:
            return touched
        seen = hand_zones[touched]
        moved = np.empty(seen.shape[0], dtype=np.bool_)
        moved[0] = int(seen[0]) != self._last_hand_zone
        moved[1:] = seen[1:] != seen[:-1]
        return touched[moved]

    def _motor_state(self) -> tuple[bool, float, float]:
        """Motor on, its ripple on the load cell (kPa), battery use per sample (percent)."""
        motor_on = self.motor_on
        ripple_kpa = MOTOR_RIPPLE_KPA_PER_LEVEL * self.intensity if motor_on else 0.0
        drain_percent = (
            IDLE_DRAIN_PERCENT_PER_S
            + (MOTOR_DRAIN_PERCENT_PER_S_PER_LEVEL * self.intensity if motor_on else 0.0)
        ) * (1.0 / self.sample_rate_hz)
        return motor_on, ripple_kpa, drain_percent

    def _on_power_off(self, reason: ShutdownReason) -> None:
        self._stop_program(PROGRAM_END_OF_SHUTDOWN[reason])

    def hold_hand(self, hand: Hand) -> None:
        """From the next sample on, ``hand`` holds the device (its times count from boot)."""
        if self.is_powered:
            self.catch_up()  # samples up to now were taken under the old hand
        self.hand = hand

    def shutdown(self) -> None:
        """A long press that powers the device off (SHUTDOWN with reason BUTTON)."""
        self.catch_up()
        self.power_off(ShutdownReason.BUTTON)


class _Row(NamedTuple):
    """What one device's sensors read over a block: a row of a :class:`_Block` (arrays),
    or a live tick in plain lists (:meth:`SimulatedMassager._read_each`); an element has
    the same value either way."""

    times_s: npt.NDArray[np.float64] | list[float]
    hand_kpa: npt.NDArray[np.float64] | list[float]
    hand_zones: npt.NDArray[np.uint8] | list[int]
    touching: npt.NDArray[np.bool_] | list[bool]
    pressure_noise: npt.NDArray[np.float64] | list[float]
    ripple_noise: npt.NDArray[np.float64] | list[float]
    temperature_noise: npt.NDArray[np.float64]
    pressure_kpa: npt.NDArray[np.float64] | list[float]


class _Block(NamedTuple):
    """What the sensors of a fleet read over one block of sample times, before the
    firmware acts on it: ``(devices, samples)`` arrays, a row per device."""

    times_s: npt.NDArray[np.float64]
    hand: HandState  # the true load, the zone the hand is on, touching
    # Standard normal draws: the load cell's noise and the motor's ripple.
    pressure_noise: npt.NDArray[np.float64]
    ripple_noise: npt.NDArray[np.float64]
    temperature_noise: npt.NDArray[np.float64]  # in degrees C
    # The readings, with each device's ripple of the motor as it ran at the block's start.
    pressure_kpa: npt.NDArray[np.float64]

    def row(self, index: int) -> _Row:
        """Device ``index``'s readings (views of the block's rows)."""
        return _Row(
            self.times_s,
            self.hand.pressure_kpa[index],
            self.hand.zone[index],
            self.hand.touching[index],
            self.pressure_noise[index],
            self.ripple_noise[index],
            self.temperature_noise[index],
            self.pressure_kpa[index],
        )


def generate_massagers(
    devices: Sequence[SimulatedMassager], times_s: npt.NDArray[np.float64]
) -> list[npt.NDArray[np.void]]:
    """The samples of every device at ``times_s`` (seconds since its boot), updating their
    firmware state; fewer for a device whose battery ran out on the way.

    The one definition of a massager's samples: a device on its own is a fleet of one
    (:meth:`SimulatedMassager._generate`). The hands, the sensors' noise and readings of
    all devices are worked out together, in ``(devices, samples)`` arrays. A device where
    nothing happens over the block (no program, no zone reached, no contact change, no
    battery report) gets its samples with the other quiet ones in the same arrays; on one
    where something happens the firmware reacts sample by sample
    (:meth:`SimulatedMassager._react`), with the same float operations in the same order.
    """
    count = int(times_s.shape[0])
    if len(devices) == 1 and count < EACH_MAX_SAMPLES:
        # One device, a live tick: the same definitions on plain floats cost less than
        # numpy calls on a few values (see SimulatedMassager._read_each).
        device = devices[0]
        return [device._react(device._read_each(times_s))]
    # Every random number of the block is drawn up front, always the same amount, so that
    # the stream (and so the telemetry) depends only on the seed. One draw of 3 x count
    # gives the numbers of three draws of count (pressure, ripple, temperature), in order.
    if len(devices) == 1:
        noise = devices[0]._sensor_normals(3 * count).reshape(1, -1)
    else:
        noise = np.stack([device._sensor_normals(3 * count) for device in devices])
    hands = [device.hand for device in devices]
    hand = evaluate_hands(hands, times_s)
    motor = [device._motor_state() for device in devices]
    ripple_kpa = _per_device([ripple for _, ripple, _ in motor])
    sigma_kpa = noise_sigma_kpa(
        _per_device([h.noise_floor_kpa for h in hands]),
        _per_device([h.noise_fraction for h in hands]),
        hand.pressure_kpa,
    )
    pressure_noise, ripple_noise = noise[:, :count], noise[:, count : 2 * count]
    block = _Block(
        times_s,
        hand,
        pressure_noise,
        ripple_noise,
        noise[:, 2 * count :] * TEMPERATURE_NOISE_C,
        sensor_reading_kpa(
            hand.pressure_kpa, sigma_kpa, pressure_noise, ripple_noise, ripple_kpa, hand.touching
        ),
    )
    # A device or two cost less going straight to _react, which takes a quiet block as one
    # quiet run.
    samples: list[npt.NDArray[np.void] | None] = [None] * len(devices)
    if len(devices) >= FLEET_MIN_DEVICES and count:
        quiet, charges = _quiet_rows(devices, block, motor)
        if quiet:
            taken = _take_quiet(devices, block, quiet, charges, motor)
            for row, row_samples in zip(quiet, taken, strict=True):
                samples[row] = row_samples
    for index, device in enumerate(devices):
        if samples[index] is None:
            samples[index] = device._react(block.row(index))
    return [s for s in samples if s is not None]


def _per_device(values: list[float]) -> FloatValues:
    """A value per device, to broadcast over ``(devices, samples)`` arrays: a column, or
    for one device the value itself (the same element by element, for less)."""
    if len(values) == 1:
        return values[0]
    return np.array(values)[:, None]


def _quiet_rows(
    devices: Sequence[SimulatedMassager], block: _Block, motor: Sequence[tuple[bool, float, float]]
) -> tuple[list[int], npt.NDArray[np.float64]]:
    """The rows of ``block`` (at least one sample) where nothing happens that the firmware
    reacts to, and every device's battery charge over the block if it drains quietly."""
    count = int(block.times_s.shape[0])
    zones = block.hand.zone
    last_zones = np.array([[device._last_hand_zone] for device in devices])
    # Every sample off the skin, or on the zone the hand was last on: no zone reached.
    no_zone = ((zones == NO_ZONE) | (zones == last_zones)).all(axis=1)
    contact = np.array([device.contact for device in devices])
    readings = block.pressure_kpa
    no_switch = np.where(
        contact,
        readings.min(axis=1) >= CONTACT_OFF_KPA,
        readings.max(axis=1) < CONTACT_ON_KPA,
    )
    # The battery reports nothing while the charge stays above the quiet floor.
    charges = quiet_charges(
        np.array([device.battery_charge_percent for device in devices]),
        np.array([drain for _, _, drain in motor]),
        count,
    )
    floors = np.array([[device._battery_quiet_floor_percent()] for device in devices])
    no_report = (charges[:, 1:] > floors).all(axis=1)
    free = no_zone & no_switch & no_report
    rows = [row for row in np.flatnonzero(free).tolist() if devices[row]._program_run is None]
    return rows, charges


def _take_quiet(
    devices: Sequence[SimulatedMassager],
    block: _Block,
    rows: list[int],
    charges: npt.NDArray[np.float64],
    motor: Sequence[tuple[bool, float, float]],
) -> list[npt.NDArray[np.void]]:
    """The samples of the quiet ``rows`` of ``block``, together: every field but pressure
    and temperature holds over the block, the battery drains quietly (to the charge
    ``charges`` ends at, as _drain_battery_quietly gives it), the sensor's temperature
    follows the skin or the air."""
    count = int(block.times_s.shape[0])
    quiet = [devices[row] for row in rows]
    for device, charge_percent in zip(quiet, charges[rows, count].tolist(), strict=True):
        device._battery_charge_percent = charge_percent
    targets_c = [device.skin_baseline_c if device.contact else AMBIENT_C for device in quiet]
    sensors_c = [device.sensor_temperature_c for device in quiet]
    alphas = [device._thermal_alpha() for device in quiet]
    if len(quiet) < FLEET_LAG_MIN_DEVICES:
        # A few devices: plain floats cost less than a numpy call per step.
        temperatures = np.array(
            [
                thermal_lag(sensor_c, target_c, alpha, count)
                for sensor_c, target_c, alpha in zip(sensors_c, targets_c, alphas, strict=True)
            ]
        )
    else:
        lagged = thermal_lag(np.array(sensors_c), np.array(targets_c), np.array(alphas), count)
        temperatures = np.stack(lagged, axis=1)
    values = [
        device._run_values(device.battery_percent, device.zone, device.contact, motor[row][0], 0)
        for device, row in zip(quiet, rows, strict=True)
    ]
    taken_samples = _Runs.blocks(values, count, quiet[0].sample_dtype)
    taken_samples["pressure_dapa"] = np.rint(
        np.divide(block.pressure_kpa[rows], PRESSURE_KPA_PER_UNIT)
    )
    taken_samples["skin_temperature_centi_c"] = np.rint(
        np.add(temperatures, block.temperature_noise[rows]) / TEMPERATURE_C_PER_UNIT
    )
    for device, last_c in zip(quiet, temperatures[:, -1].tolist(), strict=True):
        device.sensor_temperature_c = last_c
    return list(taken_samples)


_Temperature = TypeVar("_Temperature", float, npt.NDArray[np.float64])


def thermal_lag(
    sensor_c: _Temperature, target_c: _Temperature, alpha: _Temperature, count: int
) -> list[_Temperature]:
    """The head's sensor following the skin or the air with a first-order lag: its
    temperature after each of ``count`` samples (floats, or arrays of one per device).
    ``alpha``: the weight of one sample's step (:meth:`SimulatedMassager._thermal_alpha`)."""
    lagged: list[_Temperature] = []
    for _ in range(count):
        sensor_c = sensor_c + (target_c - sensor_c) * alpha
        lagged.append(sensor_c)
    return lagged


@overload
def sensor_reading_kpa(  # type: ignore[overload-overlap]
    true_kpa: float,
    noise_sigma_kpa: float,
    pressure_noise: float,
    ripple_noise: float,
    ripple_kpa: float,
    touching: bool,
) -> float: ...


@overload
def sensor_reading_kpa(
    true_kpa: FloatValues,
    noise_sigma_kpa: FloatValues,
    pressure_noise: FloatValues,
    ripple_noise: FloatValues,
    ripple_kpa: FloatValues,
    touching: bool | npt.NDArray[np.bool_],
) -> npt.NDArray[np.float64]: ...


def sensor_reading_kpa(
    true_kpa: FloatValues,
    noise_sigma_kpa: FloatValues,
    pressure_noise: FloatValues,
    ripple_noise: FloatValues,
    ripple_kpa: FloatValues,
    touching: bool | npt.NDArray[np.bool_],
) -> FloatValues:
    """Pressure readings: the true load with the load cell's noise, plus the motor's
    ripple while touching, clipped to the sensor's range (floats, or arrays)."""
    reading_kpa = true_kpa + pressure_noise * noise_sigma_kpa + ripple_noise * ripple_kpa * touching
    # What np.clip does, without its Python wrapper.
    if isinstance(reading_kpa, float):
        # One reading: the comparisons np.clip makes, on a float.
        reading_kpa = reading_kpa if reading_kpa > 0.0 else 0.0
        return reading_kpa if reading_kpa < SENSOR_MAX_KPA else SENSOR_MAX_KPA
    # What np.clip does, without its Python wrapper.
    clipped: FloatValues = np.minimum(np.maximum(reading_kpa, 0.0), SENSOR_MAX_KPA)
    return clipped


class _Runs:
    """Sample fields that change only when something happens, kept as runs of equal values:
    the values of ``_RUN_FIELDS`` from each start sample on."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.values: list[tuple[int, int, int, int, int]] = []

    def add(self, start: int, values: tuple[int, int, int, int, int]) -> None:
        """The values of the samples from ``start`` on (a new run if they differ)."""
        if not self.values or values != self.values[-1]:
            self.starts.append(start)
            self.values.append(values)

    def samples(self, count: int, dtype: np.dtype[np.void]) -> npt.NDArray[np.void]:
        """``count`` samples (writable) with the runs' fields set and the others zero."""
        if dtype is not MASSAGER_SAMPLE_DTYPE or not _RUN_SAMPLE_LAYOUT:
            samples = np.zeros(count, dtype=dtype)
            self.write(samples)
            return samples
        # Straight from the bytes: one numpy call instead of one per field.
        if len(self.values) <= 1:
            # A live tick, most of the time: one value per field.
            data = (
                _RUN_SAMPLE.pack(*self.values[0]) * count
                if self.values
                else bytes(dtype.itemsize * count)
            )
        else:
            ends = [*self.starts[1:], count]
            data = b"".join(
                _RUN_SAMPLE.pack(*values) * (end - start)
                for start, end, values in zip(self.starts, ends, self.values, strict=True)
            )
        return np.frombuffer(bytearray(data), dtype=dtype)

    @staticmethod
    def blocks(
        values: Sequence[tuple[int, int, int, int, int]], count: int, dtype: np.dtype[np.void]
    ) -> npt.NDArray[np.void]:
        """``count`` samples for each of ``values`` (a row each, writable), with the fields
        of ``_RUN_FIELDS`` set to those values and the others zero."""
        if dtype is not MASSAGER_SAMPLE_DTYPE or not _RUN_SAMPLE_LAYOUT:
            samples = np.zeros((len(values), count), dtype=dtype)
            for column, name in enumerate(_RUN_FIELDS):
                samples[name] = np.array([row[column] for row in values], np.uint8)[:, None]
            return samples
        data = b"".join(_RUN_SAMPLE.pack(*row) * count for row in values)
        return np.frombuffer(bytearray(data), dtype=dtype).reshape(len(values), count)

    def write(self, samples: npt.NDArray[np.void]) -> None:
        """Write the runs' fields into ``samples`` (as many as the runs cover)."""
        if len(self.values) == 1:
            # A live tick, most of the time: one value per field.
            for name, value in zip(_RUN_FIELDS, self.values[0], strict=True):
                samples[name] = value
        elif self.values:
            run_lengths = np.diff(np.array([*self.starts, samples.shape[0]]))
            columns = np.repeat(np.array(self.values, dtype=np.uint8), run_lengths, axis=0)
            for index, name in enumerate(_RUN_FIELDS):
                samples[name] = columns[:, index]


def _next_at(positions: list[int], start: int, default: int) -> int:
    """The first of the sorted ``positions`` at or after ``start`` (``default`` if none)."""
    k = bisect.bisect_left(positions, start)
    return positions[k] if k < len(positions) else default


class _ContactCrossings:
    """Where the readings of a bulk block reach the contact thresholds, as sorted sample
    positions; each list is worked out on first use (a block that keeps its contact state
    needs one). ``_generate`` may rework a reading after a program changed the motor, but
    only the one it is on, before it asks again from a later sample, so the positions from
    there on are those of the readings as they were at the start."""

    def __init__(self, pressure_kpa: npt.NDArray[np.float64]) -> None:
        self._pressure_kpa = pressure_kpa
        self._on: list[int] | None = None  # reading >= CONTACT_ON_KPA
        self._off: list[int] | None = None  # reading < CONTACT_OFF_KPA

    def next_switch(self, contact: bool, start: int, default: int) -> int:
        """The first sample at or after ``start`` that switches ``contact``."""
        if contact:
            if self._off is None:
                self._off = np.less(self._pressure_kpa, CONTACT_OFF_KPA).nonzero()[0].tolist()
            return _next_at(self._off, start, default)
        if self._on is None:
            self._on = np.greater_equal(self._pressure_kpa, CONTACT_ON_KPA).nonzero()[0].tolist()
        return _next_at(self._on, start, default)


def _no_zone_event(hand_zones: list[int], last_hand_zone: int) -> bool:
    """No sample of ``hand_zones`` is a zone event for ``_react``: each is ``NO_ZONE`` or
    the zone the hand was last on (which then stays the last one)."""
    away = hand_zones.count(NO_ZONE)
    if last_hand_zone == NO_ZONE:
        return away == len(hand_zones)
    return away + hand_zones.count(last_hand_zone) == len(hand_zones)


def _no_contact_change(pressure_kpa: list[float], contact: bool) -> bool:
    """No reading of ``pressure_kpa`` switches ``contact`` (the thresholds of ``_react``)."""
    if not pressure_kpa:
        return True
    if contact:
        return min(pressure_kpa) >= CONTACT_OFF_KPA
    return max(pressure_kpa) < CONTACT_ON_KPA
