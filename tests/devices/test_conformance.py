"""Byte-level conformance per catalogue entry: given these commands, the device receives
exactly these writes on this characteristic.

In the spirit of Buttplug's device test cases (``buttplug_tests/.../device_test_case/
test_*.yaml``: commands in, the exact writes out). Each case is a TOML file in
``conformance/``::

    [device]
    family = "foreo"                 # a catalogue family
    advertised_name = "LUNA 3"       # the simulated device's name (FOREO)
    model = "LUNA 3"                 # the catalogue model the name must resolve to
    kind = "massager"                # the simulated device's kind (OFCP)

    [[steps]]
    command = "set_intensity"        # connect, set_zone, set_mode, set_intensity,
    value = 7                        # stop_all, start_led, stop_led
    result = "OK"                    # the acknowledgement's result (default OK)
    writes = [{ characteristic = "0000fff1-...", data = "01 00 07", with_response = true }]

``start_led`` asks for red 25 mW/cm², near-infrared 10 mW/cm², 60 s, continuous. The
device is a simulated one of the family, reached through the real bleak API; the driver is
the one the application picks for the scanned device (:meth:`App.ble_transport`).
"""

from __future__ import annotations

import random
import tomllib
from pathlib import Path
from typing import Any

import pytest

from devicebridge.app import App, AppOptions
from devicebridge.config import Settings
from devicebridge.core.catalogue import DeviceCatalogue, default_catalogue
from devicebridge.device.session import session_class_for
from devicebridge.device.transport.ble import find_device
from devicebridge.errors import CommandRejectedError
from protocols import (
    CommandBody,
    MassageMode,
    ResultCode,
    SetIntensity,
    SetMode,
    SetZone,
    StartLed,
    StopAll,
    StopLed,
    Zone,
)
from protocols.foreo import mode_byte_for_name
from simulators import SimulatedWorld, VirtualClock

from .conftest import SEED, GattWrite, recording_backends

CASES = {
    path.name: tomllib.loads(path.read_text(encoding="utf-8"))
    for path in sorted((Path(__file__).parent / "conformance").glob("*.toml"))
}

# Every BLE name Buttplug's FOREO configuration scans for (device-config-v4/protocols/
# foreo.yml, "communication: btle: names", duplicates removed), and the identifiers of its
# models that are not among them ("UFO3eyes": listed as the UFO 3 LED's identifier only).
BUTTPLUG_FOREO_NAMES = frozenset(
    {
        "FOFO", "LUNA fofo", "LUNA FOFO", "LUNA PLAY SMART", "LUNA PLAYSMART2",
        "LUNA PLAY SMART2", "LUNA play smart2", "LUNA play smart 2", "LUNA 3", "LUNA3",
        "LUNA3PLUS", "LUNA3 PLUS", "LUNA 3 PLUS", "LUNA 3 plus", "LUNA 3 MEN", "LUNA3MEN",
        "LUNA MINI3", "LUNA MINI 3", "LUNA mini 3", "LUNA4PLUS", "LUNA4", "LUNA 4",
        "LUNA4 PLUS", "LUNA 4 plus", "LUNA4MEN", "LUNA 4 MEN", "LUNA 4 FOR MEN", "LUNA MINI4",
        "LUNA MINI 4", "LUNA mini 4", "LUNA 4 mini", "UFO", "UFO mini", "UFO MINI", "UFO MIN",
        "UFO2", "UFO 2", "UFOMINI2", "UFO mini 2", "UFO3", "UFO3mini", "UFO3go", "UFO3led",
        "BEAR", "BEAR_MINI", "BEAR MINI", "BEAR mini", "BEAR2", "BEAR 2", "BEAR2go",
        "BEAR2body", "BEAR2eyes", "KIWI", "KIWI derma",
    }
)  # fmt: skip
BUTTPLUG_IDENTIFIERS_ONLY = frozenset({"UFO3eyes"})

LED_RED_MW_CM2 = 25.0
LED_NEAR_INFRARED_MW_CM2 = 10.0
LED_DURATION_S = 60


def body_of(step: dict[str, Any]) -> CommandBody:
    command, value = step["command"], step.get("value")
    match command:
        case "set_zone":
            return SetZone(Zone[str(value).upper()])
        case "set_mode":
            return SetMode(MassageMode[str(value).upper()])
        case "set_intensity":
            assert isinstance(value, int)
            return SetIntensity(value)
        case "stop_all":
            return StopAll()
        case "start_led":
            return StartLed(LED_RED_MW_CM2, LED_NEAR_INFRARED_MW_CM2, 0.0, LED_DURATION_S)
        case "stop_led":
            return StopLed()
    raise AssertionError(f"unknown command {command!r} in a conformance case")


def expected(step: dict[str, Any]) -> list[tuple[str, bytes, bool]]:
    return [
        (w["characteristic"], bytes.fromhex(w["data"]), w["with_response"]) for w in step["writes"]
    ]


def got(writes: list[GattWrite]) -> list[tuple[str, bytes, bool]]:
    return [(w.characteristic, w.data, w.with_response) for w in writes]


@pytest.mark.parametrize("case", sorted(CASES))
async def test_commands_give_exactly_these_writes(case: str) -> None:
    spec = CASES[case]
    device = spec["device"]
    clock = VirtualClock()
    world = SimulatedWorld(seed=SEED, clock=clock)
    if device["family"] == "foreo":
        sim: Any = world.add_foreo(name=device["advertised_name"])
    elif device["kind"] == "massager":
        sim = world.add_massager()
    else:
        sim = world.add_mask()
    writes: list[GattWrite] = []
    backends = recording_backends(world, writes)
    app = App(AppOptions(settings=Settings(), simulate=False, sim_seed=SEED))
    app.clock, app.ble_backends = clock, backends
    async with world:
        clock.start()
        try:
            found = await find_device(
                clock, lambda d: d.address == sim.address, 5.0, backends.scanner
            )
            assert found.family == device["family"]
            if "model" in device:
                assert found.model == device["model"]
            session = session_class_for(found.kind)(
                app.ble_transport(found), clock, rng=random.Random(SEED), name=found.name
            )
            try:
                for number, step in enumerate(spec["steps"], start=1):
                    writes.clear()
                    result = ResultCode.OK
                    if step["command"] == "connect":
                        await session.start()
                    else:
                        try:
                            await session.send(body_of(step))
                        except CommandRejectedError as rejected:
                            result = ResultCode(rejected.result)
                    where = f"{case} step {number} ({step['command']})"
                    assert result.name == step.get("result", "OK"), where
                    assert got(writes) == expected(step), where
            finally:
                await session.close()
        finally:
            await clock.stop()


def test_every_catalogue_family_has_conformance_cases(catalogue: DeviceCatalogue) -> None:
    covered = {spec["device"]["family"] for spec in CASES.values()}
    assert covered == {family.id for family in catalogue.families}


def test_the_foreo_entry_lists_buttplugs_names_with_the_mode_its_rule_gives() -> None:
    family = default_catalogue().family("foreo")
    assert family is not None
    names = {name: model for model in family.models for name in model.names}
    assert set(names) == BUTTPLUG_FOREO_NAMES | BUTTPLUG_IDENTIFIERS_ONLY
    for name, model in names.items():
        assert model.options["mode"] == mode_byte_for_name(name), name
    assert {m.options["mode"] for m in family.models} == {0, 1, 3}


def test_devices_of_every_family_share_one_world_in_any_order() -> None:
    world = SimulatedWorld(seed=SEED, clock=VirtualClock())
    luna = world.add_foreo(name="LUNA 3")
    massager = world.add_massager()
    ufo = world.add_foreo(name="UFO")
    mask = world.add_mask()
    addresses = {d.address for d in (luna, massager, ufo, mask)}
    assert len(addresses) == 4
    assert world.all_devices == [massager, mask, luna, ufo]
    assert world.peripheral_by_address(luna.address) is luna
    assert world.device_by_address(luna.address) is None  # not OFCP firmware
    assert world.device_by_address(massager.address) is massager
