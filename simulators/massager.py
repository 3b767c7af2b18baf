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
    ShutdownReason,
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

        zones: list[int] = []
        flags: list[int] = []
        temperatures: list[float] = []
        batteries: list[int] = []
        intensities: list[int] = []
        modes: list[int] = []
        for i in range(count):
            t_s = float(times_s[i])
            hand_zone = int(hand.zone[i])
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
            zones.append(sample_zone)
            flags.append(
                (MASSAGER_FLAG_CONTACT if self.contact else 0)
                | (MASSAGER_FLAG_MOTOR_ON if motor_on else 0)
                | program_flag
            )
            temperatures.append(self.sensor_temperature_c)
            batteries.append(self.battery_percent)
            intensities.append(self.intensity)
            modes.append(int(self.mode))

        samples = np.zeros(count, dtype=self.sample_dtype)
        samples["pressure_dapa"] = np.round(pressure_kpa[:count] / PRESSURE_KPA_PER_UNIT)
        samples["skin_temperature_centi_c"] = np.round(
            (np.asarray(temperatures) + temperature_noise[:count]) / TEMPERATURE_C_PER_UNIT
        )
        samples["battery_percent"] = batteries
        samples["zone"] = zones
        samples["intensity"] = intensities
        samples["mode"] = modes
        samples["flags"] = flags
        return samples

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
