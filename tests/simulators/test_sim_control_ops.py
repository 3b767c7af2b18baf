"""Control operations of standalone devices: the hand, the skin, and reading the state."""

from __future__ import annotations

from typing import Any

import pytest

from protocols.telemetry import pressure_kpa, skin_temperature_c
from simulators import SimulatedWorld, VirtualClock
from simulators.control import ControlServer, FaultController, control_request
from simulators.faults.injector import FaultInjector

from .conftest import SEED


@pytest.fixture
async def controlled(
    world: SimulatedWorld, clock: VirtualClock
) -> Any:  # an async generator fixture: (controller, massager, mask)
    massager = world.add_massager()
    mask = world.add_mask()
    injectors = [FaultInjector(d, seed=SEED, world=world).install() for d in world.devices]
    async with world:
        yield FaultController(injectors, clock), massager, mask


async def test_a_hand_presses_from_the_next_sample_on(controlled: Any, clock: VirtualClock) -> None:
    controller, massager, _ = controlled
    await clock.advance(1.0)
    answer = controller.handle(
        {"op": "hand", "device": massager.serial_number, "zone": "cheek_left", "pressure_kpa": 20}
    )
    assert answer["ok"], answer
    (applied,) = answer["applied"]
    first = applied["next_sequence"]
    assert first == massager.next_sequence == 100  # one second at 100 Hz, taken before
    await clock.advance(0.5)
    _, samples = massager.ring.range(first, 50)
    assert pressure_kpa(samples) == pytest.approx(20.0, abs=3.0)
    (state,) = controller.handle({"op": "state", "device": massager.serial_number})["devices"]
    assert state["contact"] is True
    assert state["zone"] == "cheek_left"
    assert state["pressure_kpa"] == pytest.approx(20.0, abs=3.0)
    assert state["motor_on"] is False  # nobody switched it on
    assert state["program_running"] is False
    assert state["program_end_reason"] is None

    assert controller.handle({"op": "hand", "device": massager.serial_number, "clear": True})["ok"]
    await clock.advance(0.5)
    (state,) = controller.handle({"op": "state", "device": massager.serial_number})["devices"]
    assert (state["contact"], state["pressure_kpa"]) == (False, 0.0)


async def test_a_held_skin_temperature_is_what_the_mask_reads(
    controlled: Any, clock: VirtualClock
) -> None:
    controller, _, mask = controlled
    await clock.advance(1.0)
    answer = controller.handle({"op": "skin", "device": mask.serial_number, "temperature_c": 44})
    assert answer["ok"], answer
    first = answer["applied"][0]["next_sequence"]
    await clock.advance(1.0)
    _, samples = mask.ring.range(first, 10)
    assert skin_temperature_c(samples) == pytest.approx(44.0, abs=0.1)
    (state,) = controller.handle({"op": "state", "device": mask.serial_number})["devices"]
    assert state["skin_temperature_held_c"] == 44.0
    assert state["led_on"] is False
    assert state["irradiance_mw_cm2"] == {"red": 0.0, "near_infrared": 0.0, "blue": 0.0}
    controller.handle({"op": "skin", "device": mask.serial_number, "clear": True})
    await clock.advance(10.0)
    (state,) = controller.handle({"op": "state", "device": mask.serial_number})["devices"]
    assert state["skin_temperature_held_c"] is None
    assert 33.4 < state["skin_temperature_c"] < 44.0  # cooling back towards the skin


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"op": "hand", "zone": "elbow", "pressure_kpa": 5}, "zone must be one of"),
        ({"op": "hand", "zone": "chin", "pressure_kpa": -1}, "pressure_kpa must be in 0..1000"),
        ({"op": "hand", "zone": "chin", "pressure_kpa": "x"}, "pressure_kpa must be a number"),
        ({"op": "hand", "zone": "chin", "pressure_kpa": 5, "contact": 1}, "contact must be"),
        ({"op": "skin", "temperature_c": float("nan")}, "temperature_c must be in"),
        ({"op": "skin", "temperature_c": 400}, "temperature_c must be in -40..125"),
        ({"op": "state", "device": "nope"}, "no device 'nope'"),
        ({"op": "shake"}, "unknown op 'shake'"),
    ],
)
async def test_bad_requests_are_answered_not_applied(
    controlled: Any, request_: dict[str, Any], error: str
) -> None:
    controller, massager, mask = controlled
    answer = controller.handle(request_)
    assert answer["ok"] is False
    assert error in answer["error"]
    assert controller.handle({"op": "hand", "device": mask.serial_number, "clear": True}) == {
        "ok": False,
        "error": f"hand: {mask.serial_number} is not a massager",
    }
    assert not controller.handle(
        {"op": "skin", "device": massager.serial_number, "temperature_c": 40}
    )["ok"]


async def test_the_operations_travel_over_the_control_port(controlled: Any) -> None:
    controller, massager, mask = controlled
    server = ControlServer(controller)
    await server.start()
    try:
        answer = await control_request(*server.address, {"op": "state"})
        assert [d["device"] for d in answer["devices"]] == [
            massager.serial_number,
            mask.serial_number,
        ]
        assert [d["kind"] for d in answer["devices"]] == ["massager", "mask"]
        assert answer["devices"][0]["events"][0]["code"] == "boot"
    finally:
        await server.stop()
