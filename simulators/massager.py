"""A handheld facial massager: motor, pressure sensor, contact detection, zones, buttons."""

from __future__ import annotations

import math
from typing import ClassVar, Final, Unpack

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
from protocols.messages import MAX_INTENSITY_LEVEL
from protocols.telemetry import (
    MASSAGER_FLAG_CONTACT,
    MASSAGER_FLAG_MOTOR_ON,
    MASSAGER_FLAG_PROGRAM_RUNNING,
    PRESSURE_KPA_PER_UNIT,
    TEMPERATURE_C_PER_UNIT,
)
from simulators.clock import VirtualClock
from simulators.device import (
    Button,
    DeviceOptions,
    Press,
    RandomStream,
    SimulatedDevice,
    derived_seed,
)
from simulators.hand import HandScript
from simulators.program_runner import MassagerProgramRun

MASSAGER_SAMPLE_RATE_HZ: Final = 100
# Contact detection with hysteresis, so sensor noise at the threshold does not
# chatter CONTACT_CHANGED events. Below the lightest eye-area band (0.5 kPa).
CONTACT_ON_KPA: Final = 0.3
CONTACT_OFF_KPA: Final = 0.15
# Full scale of the u16 pressure field in 0.01 kPa.
SENSOR_MAX_KPA: Final = 0xFFFF * PRESSURE_KPA_PER_UNIT
# The motor shakes the load cell: extra noise per intensity level while touching.
MOTOR_RIPPLE_KPA_PER_LEVEL: Final = 0.02
# Forehead skin baseline 33.4 +- 0.8 degC (domain-safety.md, Temperature [A]).
SKIN_BASELINE_C: Final = 33.4
SKIN_BASELINE_SPREAD_C: Final = 0.8
AMBIENT_C: Final = 24.0
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
# Blocks at least this long are generated in bulk between events (see _generate).
BULK_MIN_SAMPLES: Final = 48
MODE_CYCLE: Final = (MassageMode.VIBRATION, MassageMode.PERCUSSION, MassageMode.PULSE)
_PROGRAM_END_OF_SHUTDOWN: Final = {
    ShutdownReason.BATTERY_EMPTY: ProgramEndReason.LOW_BATTERY,
    ShutdownReason.BUTTON: ProgramEndReason.BUTTON,
    ShutdownReason.HOST: ProgramEndReason.STOPPED_BY_HOST,
}


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
        hand: HandScript | None = None,
        **options: Unpack[DeviceOptions],
    ) -> None:
        super().__init__(clock, **options)
        self.hand = (
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

    def _generate(self, times_s: npt.NDArray[np.float64]) -> npt.NDArray[np.void]:
        count = int(times_s.shape[0])
        hand = self.hand.evaluate(times_s)
        # Draw every random number of the block up front, always the same amount,
        # so that the stream (and so the telemetry) depends only on the seed.
        pressure_noise = self.sensor_rng.standard_normal(count)
        ripple_noise = self.sensor_rng.standard_normal(count)
        temperature_noise = self.sensor_rng.standard_normal(count) * TEMPERATURE_NOISE_C
        # Commands and buttons take the samples due before they act, so the motor holds
        # its state over a block, except when a running program switches it mid-block:
        # then the pressure of the following samples is worked out again, one by one,
        # with the same float operations in the same order.
        base_kpa = hand.pressure_kpa + pressure_noise * self.hand.noise_sigma_kpa(hand.pressure_kpa)
        touching = hand.touching
        motor_on, ripple_kpa, drain_percent = self._motor_state()
        block_ripple_kpa = ripple_kpa
        pressure_kpa = np.clip(base_kpa + ripple_noise * ripple_kpa * touching, 0.0, SENSOR_MAX_KPA)
        period_s = 1.0 / self.sample_rate_hz
        thermal_alpha = 1.0 - math.exp(-period_s / SENSOR_THERMAL_TAU_S)

        zones = np.empty(count, dtype=np.uint8)
        flags = np.empty(count, dtype=np.uint8)
        temperatures = np.empty(count, dtype=np.float64)
        batteries = np.empty(count, dtype=np.uint8)
        intensities = np.empty(count, dtype=np.uint8)
        modes = np.empty(count, dtype=np.uint8)
        # Where something happens that the firmware must react to one sample at a time: the
        # hand reaching another zone, contact going on or off (with hysteresis). In between,
        # without a program, every sample is the same but for pressure and temperature, and
        # is written in bulk.
        # Small blocks (live ticks of about 10 samples) cost less one sample at a time than
        # in the numpy calls that find the events; both ways give the same samples.
        hand_zones = hand.zone
        bulk = count >= BULK_MIN_SAMPLES
        if bulk:
            zone_events = self._hand_zone_events(hand_zones)
            contact_on = np.flatnonzero(pressure_kpa >= CONTACT_ON_KPA)
            contact_off = np.flatnonzero(pressure_kpa < CONTACT_OFF_KPA)
        i = 0
        while i < count:
            if bulk and self._program_run is None and ripple_kpa == block_ripple_kpa:
                quiet_end = min(
                    _next_at(zone_events, i, count),
                    _next_at(contact_off if self.contact else contact_on, i, count),
                )
                quiet = self._drain_battery_quietly(drain_percent, quiet_end - i)
                if quiet:
                    end = i + quiet
                    zones[i:end] = int(self.zone)
                    flags[i:end] = (MASSAGER_FLAG_CONTACT if self.contact else 0) | (
                        MASSAGER_FLAG_MOTOR_ON if motor_on else 0
                    )
                    # The sensor's first-order lag, one step per sample as below.
                    target_c = self.skin_baseline_c if self.contact else AMBIENT_C
                    sensor_c = self.sensor_temperature_c
                    for j in range(i, end):
                        sensor_c += (target_c - sensor_c) * thermal_alpha
                        temperatures[j] = sensor_c
                    self.sensor_temperature_c = sensor_c
                    batteries[i:end] = self.battery_percent
                    intensities[i:end] = self.intensity
                    modes[i:end] = int(self.mode)
                    i = end
                    continue
            t_s = float(times_s[i])
            hand_zone = int(hand_zones[i])
            if hand_zone != Zone.NONE and hand_zone != self._last_hand_zone:
                # The hand moved to another zone: that wins over an earlier SET_ZONE.
                self._last_hand_zone = hand_zone
                self._set_zone(Zone(hand_zone), t_s)
            if ripple_kpa != block_ripple_kpa:
                pressure_kpa[i] = np.clip(
                    base_kpa[i] + ripple_noise[i] * ripple_kpa * touching[i], 0.0, SENSOR_MAX_KPA
                )
            pressure = float(pressure_kpa[i])
            if not self.contact and pressure >= CONTACT_ON_KPA:
                self.contact = True
                self._emit(EventCode.CONTACT_CHANGED, b"\x01", t_s)
            elif self.contact and pressure < CONTACT_OFF_KPA:
                self.contact = False
                self._emit(EventCode.CONTACT_CHANGED, b"\x00", t_s)
            target_c = self.skin_baseline_c if self.contact else AMBIENT_C
            self.sensor_temperature_c += (target_c - self.sensor_temperature_c) * thermal_alpha
            program_flag = 0
            # The reading was taken on the zone the device was on before the program
            # (possibly) moves to its next step on this very sample: label it with that one,
            # or the sample that completes a step would count toward the next zone.
            sample_zone = int(self.zone)
            run = self._program_run
            if run is not None:
                # The firmware's control loop sees each reading before it is logged, so
                # a hard-limit stop shows in the very sample that crossed the limit.
                run.on_sample(
                    t_s,
                    round(pressure / PRESSURE_KPA_PER_UNIT),
                    self.contact,
                    round(
                        (self.sensor_temperature_c + float(temperature_noise[i]))
                        / TEMPERATURE_C_PER_UNIT
                    ),
                )
                if run.finished:
                    self._program_run = None
                else:
                    program_flag = MASSAGER_FLAG_PROGRAM_RUNNING
                motor_on, ripple_kpa, drain_percent = self._motor_state()
            if not self._drain_battery(drain_percent, t_s):
                count = i
                break
            zones[i] = sample_zone
            flags[i] = (
                (MASSAGER_FLAG_CONTACT if self.contact else 0)
                | (MASSAGER_FLAG_MOTOR_ON if motor_on else 0)
                | program_flag
            )
            temperatures[i] = self.sensor_temperature_c
            batteries[i] = self.battery_percent
            intensities[i] = self.intensity
            modes[i] = int(self.mode)
            i += 1

        samples = np.zeros(count, dtype=self.sample_dtype)
        samples["pressure_dapa"] = np.round(pressure_kpa[:count] / PRESSURE_KPA_PER_UNIT)
        samples["skin_temperature_centi_c"] = np.round(
            (temperatures[:count] + temperature_noise[:count]) / TEMPERATURE_C_PER_UNIT
        )
        samples["battery_percent"] = batteries[:count]
        samples["zone"] = zones[:count]
        samples["intensity"] = intensities[:count]
        samples["mode"] = modes[:count]
        samples["flags"] = flags[:count]
        return samples

    def _hand_zone_events(self, hand_zones: npt.NDArray[np.uint8]) -> npt.NDArray[np.intp]:
        """Samples where the hand reaches a zone other than the last one it was on."""
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
        self._stop_program(_PROGRAM_END_OF_SHUTDOWN[reason])

    def shutdown(self) -> None:
        """A long press that powers the device off (SHUTDOWN with reason BUTTON)."""
        self.catch_up()
        self.power_off(ShutdownReason.BUTTON)


def _next_at(positions: npt.NDArray[np.intp], start: int, default: int) -> int:
    """The first of the sorted ``positions`` at or after ``start`` (``default`` if none)."""
    k = int(np.searchsorted(positions, start))
    return int(positions[k]) if k < positions.shape[0] else default
