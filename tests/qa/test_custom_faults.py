"""Faults of a QA engineer's own, through the seams of a simulated device (docs/qa.md,
"Writing a fault of your own": the two faults here are the ones printed there)."""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt

from devicebridge.core.engine import DecisionKind
from devicebridge.qa import QaBridge
from protocols import Ack, Command, Opcode
from simulators import SimulatedDevice
from simulators.devices.device import CommandProceed, SampleFilter
from tests.qa.conftest import SHORT_ROUTINE

# ---- as in docs/qa.md


def pressure_reads_high(
    device: SimulatedDevice, factor: float = 1.5, from_s: float = 10.0
) -> SampleFilter:
    """The load cell reads ``factor`` times the true pressure from ``from_s`` after boot."""

    def sample_filter(
        times_s: npt.NDArray[np.float64], samples: npt.NDArray[np.void]
    ) -> npt.NDArray[np.void]:
        late = times_s[: samples.shape[0]] >= from_s  # fewer samples when the battery died
        high = np.minimum(samples["pressure_dapa"] * factor, 0xFFFF).astype(np.uint16)
        samples["pressure_dapa"] = np.where(late, high, samples["pressure_dapa"])
        return samples

    device.sample_filters.append(sample_filter)
    return sample_filter


class BusyFirmware:
    """Motor commands are applied and answered ``delay_s`` late (a firmware busy elsewhere);
    the rest as usual."""

    def __init__(self, device: SimulatedDevice, delay_s: float = 0.3) -> None:
        self.device = device
        self.delay_s = delay_s
        self.delayed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        device.command_interceptors.append(self.intercept)

    def intercept(self, command: Command, proceed: CommandProceed) -> Ack | None:
        if command.opcode not in (Opcode.SET_INTENSITY, Opcode.SET_MODE):
            return proceed(command)
        self.delayed += 1
        task = asyncio.get_running_loop().create_task(self._later(command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None  # no acknowledgement now

    async def _later(self, command: Command) -> None:
        await self.device.clock.sleep(self.delay_s)
        self.device.deliver_command(command, after=self.intercept)

    def remove(self) -> None:
        self.device.command_interceptors.remove(self.intercept)


# ----


async def test_a_pressure_sensor_that_reads_high_makes_the_bridge_warn(
    bridge: QaBridge, sim_massager: SimulatedDevice
) -> None:
    pressure_reads_high(sim_massager)
    result = await bridge.run_routine(sim_massager, str(SHORT_ROUTINE), max_duration_s=60)
    warnings = [d for d in result.decisions if d.kind is DecisionKind.WARNING]
    assert any("press lighter" in d.message for d in warnings)
    # Not before the sensor went wrong (the timeline's times are the device's since boot).
    warned_s = [e.t_s for e in bridge.timeline.entries if e.what == "decision warning"]
    assert len(warned_s) == len(warnings)
    assert min(warned_s) >= 10.0


async def test_a_busy_firmware_still_runs_the_routine(
    bridge: QaBridge, sim_massager: SimulatedDevice
) -> None:
    busy = BusyFirmware(sim_massager)
    result = await bridge.run_routine(sim_massager, str(SHORT_ROUTINE), max_duration_s=60)
    assert result.status == "completed", result.end_reason
    assert busy.delayed >= 2
    assert not [d for d in result.decisions if d.kind is DecisionKind.STOP]
    busy.remove()
    assert sim_massager.command_interceptors == []
