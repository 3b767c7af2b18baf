"""An LED face mask: red, near-infrared and blue channels, a treatment timer, skin heating."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Final, Unpack

import numpy as np
import numpy.typing as npt

from protocols import (
    Capability,
    CommandBody,
    DeviceKind,
    EventCode,
    LedProgramStep,
    Opcode,
    Program,
    ProgramEndReason,
    ProgramRejection,
    ProgramRejectReason,
    ResultCode,
    SampleFormat,
    ShutdownReason,
    StartLed,
    StopLed,
    TreatmentEndReason,
)
from protocols.constants import CENTI_C_PER_C, CENTI_MW_CM2_PER_MW_CM2, DECI_HZ_PER_HZ
from protocols.program import (
    LED_CHANNEL_NAMES,
)
from protocols.telemetry import (
    IRRADIANCE_MW_CM2_PER_UNIT,
    LED_MASK_FLAG_PROGRAM_RUNNING,
    LED_MASK_FLAG_TREATMENT_RUNNING,
    LED_MASK_FLAG_WORN,
    TEMPERATURE_C_PER_UNIT,
)
from simulators.clock import VirtualClock
from simulators.devices.device import Button, DeviceOptions, Press, SimulatedDevice
from simulators.devices.program_runner import PROGRAM_END_OF_SHUTDOWN, PULSE_DUTY, MaskProgramRun
from simulators.devices.skin import AMBIENT_C, SKIN_BASELINE_C

LED_MASK_SAMPLE_RATE_HZ: Final = 10
# Wavelengths of FDA-cleared masks (domain-safety.md, LED photobiomodulation [A]).
RED_WAVELENGTH_NM: Final = 630
NEAR_INFRARED_WAVELENGTH_NM: Final = 830
BLUE_WAVELENGTH_NM: Final = 415
# What this model's LED drivers can deliver per channel; consumer masks run
# 10-60 mW/cm2 (domain-safety.md [B]). Above it START_LED is INVALID_PARAMETER.
HARDWARE_MAX_IRRADIANCE_MW_CM2: Final = 100.0
# The firmware timer's range: a session is 9-10 min typically, 20 min at most here.
MAX_TREATMENT_S: Final = 20 * 60
# Highest pulse rate the drivers do. Flicker safety (3-60 Hz) is the host's
# policy, not the hardware's: the device does what it is told within hardware limits.
MAX_PULSE_HZ: Final = 100.0
# From the skin baseline (simulators.devices.skin), the skin side rises 1-4 degC over
# 10 min at 20-60 mW/cm2 [E] (domain-safety.md, Temperature). A first-order model with
# tau 300 s and gain 0.06 degC per mW/cm2 gives +1.04 degC at 20 and +3.1 at 60
# after 600 s.
THERMAL_TAU_S: Final = 300.0
THERMAL_GAIN_C_PER_MW_CM2: Final = 0.06
# Hard stop at 43 degC (IEC 60601-1 applied parts, 10 min or more of contact;
# domain-safety.md suggests warn 41, stop 43). The firmware enforces the stop.
HARD_STOP_TEMPERATURE_C: Final = 43.0
TEMPERATURE_NOISE_C: Final = 0.02
IRRADIANCE_NOISE_FRACTION: Final = 0.005
# Battery: about two days standby, one hour at 100 mW/cm2 summed over channels.
STANDBY_LIFE_S: Final = 48 * 3600
LED_LIFE_AT_REFERENCE_S: Final = 3600
REFERENCE_IRRADIANCE_MW_CM2: Final = 100.0
IDLE_DRAIN_PERCENT_PER_S: Final = 100.0 / STANDBY_LIFE_S
LED_DRAIN_PERCENT_PER_S_PER_MW_CM2: Final = 100.0 / (
    LED_LIFE_AT_REFERENCE_S * REFERENCE_IRRADIANCE_MW_CM2
)

_END_REASON_OF_SHUTDOWN: Final = {
    ShutdownReason.BATTERY_EMPTY: TreatmentEndReason.LOW_BATTERY,
    ShutdownReason.BUTTON: TreatmentEndReason.BUTTON,
    ShutdownReason.HOST: TreatmentEndReason.STOPPED_BY_HOST,
}


@dataclass(frozen=True, slots=True)
class Treatment:
    red_mw_cm2: float
    near_infrared_mw_cm2: float
    blue_mw_cm2: float
    pulse_hz: float
    start_s: float  # seconds since boot
    end_s: float
    parameters: bytes  # the START_LED parameters, echoed in TREATMENT_STARTED

    @property
    def total_mw_cm2(self) -> float:
        return self.red_mw_cm2 + self.near_infrared_mw_cm2 + self.blue_mw_cm2

    @property
    def mean_total_mw_cm2(self) -> float:
        """Time-averaged output (pulsed light is on for the duty fraction)."""
        return self.total_mw_cm2 * (PULSE_DUTY if self.pulse_hz > 0 else 1.0)

    def light_on(self, t_s: float) -> bool:
        if self.pulse_hz <= 0:
            return True
        phase = ((t_s - self.start_s) * self.pulse_hz) % 1.0
        return phase < PULSE_DUTY


class SimulatedLedMask(SimulatedDevice):
    """START_LED runs a timed treatment that the firmware ends by itself."""

    kind: ClassVar[DeviceKind] = DeviceKind.LED_MASK
    sample_format: ClassVar[SampleFormat] = SampleFormat.LED_MASK_V1
    model_number: ClassVar[str] = "OFC-LM1"
    serial_prefix: ClassVar[str] = "LM"
    name_prefix: ClassVar[str] = "LedMask"
    capabilities: ClassVar[Capability] = (
        Capability.LED_RED
        | Capability.LED_NEAR_INFRARED
        | Capability.LED_BLUE
        | Capability.SKIN_TEMPERATURE
        | Capability.CONTACT_SENSOR
        | Capability.BUTTONS
        | Capability.BACKFILL
        | Capability.AUTO_SHUTOFF
        | Capability.PROGRAM_TRANSFER
    )
    default_sample_rate_hz: ClassVar[int] = LED_MASK_SAMPLE_RATE_HZ
    kind_opcodes: ClassVar[frozenset[Opcode]] = frozenset({Opcode.START_LED, Opcode.STOP_LED})

    def __init__(
        self, clock: VirtualClock, *, worn: bool = True, **options: Unpack[DeviceOptions]
    ) -> None:
        super().__init__(clock, **options)
        self.worn = worn
        self.treatment: Treatment | None = None
        self.skin_temperature_c = SKIN_BASELINE_C if worn else AMBIENT_C
        # A skin temperature forced from outside (a QA control), instead of the model's.
        self.skin_temperature_hold_c: float | None = None
        self._program_run: MaskProgramRun | None = None

    @property
    def busy(self) -> bool:
        return self.treatment is not None or self.program_running

    @property
    def program_running(self) -> bool:
        return self._program_run is not None

    @property
    def program_run(self) -> MaskProgramRun | None:
        """The program running now (for tests: its step index and integrated dose)."""
        return self._program_run

    # ------------------------------------------------------------------ programs

    def _check_program(self, program: Program) -> ProgramRejection | None:
        for index, step in enumerate(program.steps):
            if not isinstance(step, LedProgramStep):
                continue
            too_bright = any(
                step.irradiance_centi_mw_cm2(ch) / CENTI_MW_CM2_PER_MW_CM2
                > HARDWARE_MAX_IRRADIANCE_MW_CM2
                for ch in range(len(LED_CHANNEL_NAMES))
            )
            too_long = step.duration_s > MAX_TREATMENT_S
            too_fast = step.pulse_deci_hz / DECI_HZ_PER_HZ > MAX_PULSE_HZ
            if too_bright or too_long or too_fast:
                return ProgramRejection(ProgramRejectReason.HARDWARE_LIMIT, index)
        return None

    def _start_program(self, program: Program) -> ResultCode:
        if self.treatment is not None:
            return ResultCode.BUSY  # STOP_LED first: no silent change of a running dose
        # The firmware's own temperature stop holds whatever the program says.
        stop_centi_c = min(
            program.limits.skin_temperature_stop_centi_c,
            round(HARD_STOP_TEMPERATURE_C * CENTI_C_PER_C),
        )
        run = MaskProgramRun(
            program,
            self.sample_rate_hz,
            self._emit,
            self.uptime_s,
            temperature_stop_centi_c=stop_centi_c,
        )
        self._program_run = run
        run.begin(self.uptime_s)
        return ResultCode.OK

    def _stop_program(self, reason: ProgramEndReason) -> None:
        run = self._program_run
        if run is not None:
            # Emitted while still running: a host that is away gets it from the backlog.
            run.stop(reason, self.uptime_s)
            self._program_run = None

    # ------------------------------------------------------------------ commands

    def _execute_kind(self, body: CommandBody) -> tuple[ResultCode, bytes]:
        match body:
            case StartLed():
                if self.program_running:
                    return ResultCode.BUSY, b""
                return self._start_led(body)
            case StopLed():
                self._stop_program(ProgramEndReason.STOPPED_BY_HOST)
                self._finish(TreatmentEndReason.STOPPED_BY_HOST, None)
                return ResultCode.OK, b""
            case _:
                return ResultCode.NOT_SUPPORTED, b""

    def _start_led(self, body: StartLed) -> tuple[ResultCode, bytes]:
        channels = (body.red_mw_cm2, body.near_infrared_mw_cm2, body.blue_mw_cm2)
        if any(value > HARDWARE_MAX_IRRADIANCE_MW_CM2 for value in channels):
            return ResultCode.INVALID_PARAMETER, b""
        if not any(value > 0 for value in channels):
            return ResultCode.INVALID_PARAMETER, b""  # nothing to light
        if not 0 < body.duration_s <= MAX_TREATMENT_S or body.pulse_hz > MAX_PULSE_HZ:
            return ResultCode.INVALID_PARAMETER, b""
        if self.treatment is not None:
            return ResultCode.BUSY, b""  # STOP_LED first: no silent restart of a dose
        now_s = self.uptime_s
        self.treatment = Treatment(
            body.red_mw_cm2,
            body.near_infrared_mw_cm2,
            body.blue_mw_cm2,
            body.pulse_hz,
            now_s,
            now_s + body.duration_s,
            body.encode_params(),
        )
        self._emit(EventCode.TREATMENT_STARTED, self.treatment.parameters)
        return ResultCode.OK, b""

    def _stop_all(self) -> None:
        self._stop_program(ProgramEndReason.STOPPED_BY_HOST)
        self._finish(TreatmentEndReason.STOPPED_BY_HOST, None)

    def _finish(self, reason: TreatmentEndReason, t_s: float | None) -> None:
        if self.treatment is None:
            return
        self.treatment = None
        self._emit(EventCode.TREATMENT_FINISHED, bytes([reason]), t_s)

    def _on_power_off(self, reason: ShutdownReason) -> None:
        self._stop_program(PROGRAM_END_OF_SHUTDOWN[reason])
        self._finish(_END_REASON_OF_SHUTDOWN[reason], None)

    # ------------------------------------------------------------------ user actions

    def press_power(self, long_press: bool = False) -> None:
        """The button: stops a running treatment (reason BUTTON)."""
        if not self.is_powered:
            return
        self.catch_up()
        self._emit(
            EventCode.BUTTON, bytes([Button.POWER, Press.LONG if long_press else Press.SHORT])
        )
        self._stop_program(ProgramEndReason.BUTTON)
        self._finish(TreatmentEndReason.BUTTON, None)

    def hold_skin_temperature(self, temperature_c: float | None) -> None:
        """From the next sample on, the skin reads ``temperature_c`` (a heat source, a
        faulty thermal path) instead of what the LEDs warm it to; ``None`` lets the
        thermal model go on from there."""
        if self.is_powered:
            self.catch_up()  # samples up to now were taken at the old temperature
        self.skin_temperature_hold_c = temperature_c
        if temperature_c is not None:
            self.skin_temperature_c = temperature_c

    def put_on(self) -> None:
        self._set_worn(True)

    def take_off(self) -> None:
        self._set_worn(False)

    def _set_worn(self, worn: bool) -> None:
        if not self.is_powered or worn == self.worn:
            self.worn = worn
            return
        self.catch_up()
        self.worn = worn
        self._emit(EventCode.CONTACT_CHANGED, bytes([worn]))

    # ------------------------------------------------------------------ sampling

    def _generate(self, times_s: npt.NDArray[np.float64]) -> npt.NDArray[np.void]:
        count = int(times_s.shape[0])
        irradiance_noise = self.sensor_rng.standard_normal((count, 3)) * IRRADIANCE_NOISE_FRACTION
        temperature_noise = self.sensor_rng.standard_normal(count) * TEMPERATURE_NOISE_C
        period_s = 1.0 / self.sample_rate_hz
        thermal_alpha = 1.0 - math.exp(-period_s / THERMAL_TAU_S)
        irradiance = np.zeros((count, 3), dtype=np.float64)
        temperatures = np.zeros(count, dtype=np.float64)
        batteries = np.zeros(count, dtype=np.uint8)
        flags = np.zeros(count, dtype=np.uint8)
        for i in range(count):
            t_s = float(times_s[i])
            treatment = self.treatment
            if treatment is not None and t_s >= treatment.end_s:
                self._finish(TreatmentEndReason.COMPLETED, treatment.end_s)
                treatment = None
            mean_mw_cm2 = 0.0
            if treatment is not None:
                mean_mw_cm2 = treatment.mean_total_mw_cm2
                if treatment.light_on(t_s):
                    irradiance[i] = (
                        treatment.red_mw_cm2,
                        treatment.near_infrared_mw_cm2,
                        treatment.blue_mw_cm2,
                    )
            run = self._program_run
            program_lit = False
            if run is not None:
                # The firmware decides each sample's light from the last skin reading.
                run.on_sample(t_s, round(self.skin_temperature_c * CENTI_C_PER_C), self.worn)
                irradiance[i] = run.levels_mw_cm2
                mean_mw_cm2 = run.mean_total_mw_cm2
                program_lit = run.lit
                if run.finished:
                    self._program_run = None
            if self.skin_temperature_hold_c is None:
                base_c = SKIN_BASELINE_C if self.worn else AMBIENT_C
                target_c = base_c + THERMAL_GAIN_C_PER_MW_CM2 * mean_mw_cm2
                self.skin_temperature_c += (target_c - self.skin_temperature_c) * thermal_alpha
            else:
                self.skin_temperature_c = self.skin_temperature_hold_c
            if treatment is not None and self.skin_temperature_c >= HARD_STOP_TEMPERATURE_C:
                self._emit(
                    EventCode.OVER_TEMPERATURE,
                    self.encode_centi_celsius(self.skin_temperature_c),
                    t_s,
                )
                self._finish(TreatmentEndReason.OVER_TEMPERATURE, t_s)
                irradiance[i] = 0.0
            drain_percent = (
                IDLE_DRAIN_PERCENT_PER_S + LED_DRAIN_PERCENT_PER_S_PER_MW_CM2 * mean_mw_cm2
            ) * period_s
            if not self._drain_battery(drain_percent, t_s):
                count = i
                break
            temperatures[i] = self.skin_temperature_c
            batteries[i] = self.battery_percent
            flags[i] = (
                (LED_MASK_FLAG_WORN if self.worn else 0)
                | (
                    LED_MASK_FLAG_TREATMENT_RUNNING
                    if self.treatment is not None or program_lit
                    else 0
                )
                | (LED_MASK_FLAG_PROGRAM_RUNNING if self._program_run is not None else 0)
            )

        lit = irradiance[:count] * (1.0 + irradiance_noise[:count])
        centi = np.round(np.clip(lit, 0.0, None) / IRRADIANCE_MW_CM2_PER_UNIT)
        samples = np.zeros(count, dtype=self.sample_dtype)
        samples["red_centi_mw_cm2"] = centi[:, 0]
        samples["near_infrared_centi_mw_cm2"] = centi[:, 1]
        samples["blue_centi_mw_cm2"] = centi[:, 2]
        samples["skin_temperature_centi_c"] = np.round(
            (temperatures[:count] + temperature_noise[:count]) / TEMPERATURE_C_PER_UNIT
        )
        samples["battery_percent"] = batteries[:count]
        samples["flags"] = flags[:count]
        return samples
