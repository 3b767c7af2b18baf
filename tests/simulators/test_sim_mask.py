"""The LED mask's firmware: treatment timer, auto shut-off, skin heating, over-temperature."""

from __future__ import annotations

import numpy as np

from protocols import EventCode, StartLed, StartStream, StopAll, TreatmentEndReason
from protocols.telemetry import (
    LED_MASK_FLAG_TREATMENT_RUNNING,
    LED_MASK_FLAG_WORN,
    irradiance_mw_cm2,
    skin_temperature_c,
)
from simulators import SimulatedLedMask, SimulatedWorld, VirtualClock
from simulators.devices.mask import HARD_STOP_TEMPERATURE_C
from simulators.devices.skin import SKIN_BASELINE_C

from .conftest import Commander, RecordingLink


def connect(mask: SimulatedLedMask) -> tuple[RecordingLink, Commander]:
    link = RecordingLink()
    mask.attach_link(link)
    return link, Commander(mask, link)


async def test_timer_shuts_the_light_off(world: SimulatedWorld, clock: VirtualClock) -> None:
    mask = world.add_mask()
    link, command = connect(mask)
    await clock.advance(1.0)
    assert command(StartLed(40.0, 20.0, 0.0, 30)).ok
    assert mask.busy
    await clock.advance(31.0)
    assert mask.treatment is None
    events = [(e.code, e.payload, e.device_time_ms) for e in link.events()]
    assert events[0][0] == EventCode.BOOT  # held for the host's first command
    events = events[1:]
    assert events[0][0] == EventCode.TREATMENT_STARTED
    assert events[0][1] == StartLed(40.0, 20.0, 0.0, 30).encode_params()
    assert events[-1] == (
        EventCode.TREATMENT_FINISHED,
        bytes([TreatmentEndReason.COMPLETED]),
        31_000,
    )
    _, samples = mask.ring.range(0, mask.next_sequence)
    red = irradiance_mw_cm2(samples, "red")
    running = (samples["flags"] & LED_MASK_FLAG_TREATMENT_RUNNING) != 0
    assert np.all(samples["flags"] & LED_MASK_FLAG_WORN)
    assert int(running.sum()) == 300  # 30 s at 10 Hz
    assert np.allclose(red[running], 40.0, rtol=0.03)
    assert np.all(red[~running] == 0.0)


async def test_skin_side_warms_one_to_four_degrees_in_ten_minutes(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    rises = []
    for total_mw_cm2 in (20.0, 60.0):
        mask = world.add_mask()
        _, command = connect(mask)
        assert command(StartLed(total_mw_cm2, 0.0, 0.0, 600)).ok
        rises.append(mask)
    await clock.advance(600.0)
    measured = []
    for mask in rises:
        _, samples = mask.ring.range(mask.next_sequence - 10, 10)
        measured.append(float(skin_temperature_c(samples).mean()) - SKIN_BASELINE_C)
    assert 1.0 <= measured[0] < measured[1] <= 4.0


async def test_over_temperature_stops_the_treatment(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    mask = world.add_mask()
    link, command = connect(mask)
    assert command(StartLed(100.0, 100.0, 100.0, 1200)).ok
    assert await clock.run_until(lambda: mask.treatment is None, max_virtual_s=1200.0)
    assert clock.now_s() < 600.0
    codes = [e.code for e in link.events()]
    assert codes[-2:] == [EventCode.OVER_TEMPERATURE, EventCode.TREATMENT_FINISHED]
    assert link.events()[-1].payload == bytes([TreatmentEndReason.OVER_TEMPERATURE])
    over = int.from_bytes(link.events()[-2].payload, "little", signed=True) / 100
    assert over >= HARD_STOP_TEMPERATURE_C


async def test_stop_all_button_and_wear(world: SimulatedWorld, clock: VirtualClock) -> None:
    mask = world.add_mask()
    link, command = connect(mask)
    command(StartStream())
    command(StartLed(0.0, 30.0, 0.0, 600))
    await clock.advance(1.0)
    assert command(StopAll()).ok
    assert not mask.busy
    command(StartLed(0.0, 0.0, 40.0, 600, pulse_hz=1.0))
    await clock.advance(2.0)
    mask.press_power()
    mask.take_off()
    await clock.advance(1.0)
    finished = [e.payload[0] for e in link.events() if e.code == EventCode.TREATMENT_FINISHED]
    assert finished == [TreatmentEndReason.STOPPED_BY_HOST, TreatmentEndReason.BUTTON]
    worn = [e.payload for e in link.events() if e.code == EventCode.CONTACT_CHANGED]
    assert worn == [b"\x00"]
    samples = np.concatenate([b.samples for b in link.batches()])
    blue = irradiance_mw_cm2(samples, "blue")
    running = samples["flags"] & LED_MASK_FLAG_TREATMENT_RUNNING != 0
    second = running & (samples["near_infrared_centi_mw_cm2"] == 0)
    pulsed = blue[second]
    assert pulsed.shape[0] == 20  # from 1.0 s to the button at 3.0 s
    # 1 Hz at 50 % duty, sampled at 10 Hz: half the samples lit.
    assert 0.4 < float(np.mean(pulsed > 0)) < 0.6
    assert not samples["flags"][-1] & LED_MASK_FLAG_WORN
