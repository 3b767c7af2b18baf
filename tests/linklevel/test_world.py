"""The link-level world's own rules: the clock it needs, addresses, its public names."""

from __future__ import annotations

import pytest

import simulators.linklevel as linklevel
from simulators import SimulatedWorld, VirtualClock
from simulators.linklevel import LinkLevelWorld, controller_address


def test_every_exported_name_resolves() -> None:
    for name in linklevel.__all__:
        assert getattr(linklevel, name) is not None, name


def test_a_fast_clock_is_refused_with_the_fix_in_the_message() -> None:
    with pytest.raises(ValueError, match="realtime VirtualClock"):
        LinkLevelWorld(clock=VirtualClock())


async def test_same_devices_as_the_in_process_world_reachable_by_either_address(
    world: LinkLevelWorld,
) -> None:
    massager, mask = world.add_massager(), world.add_mask()
    plain = SimulatedWorld(seed=world.seed)
    assert [d.serial_number for d in (plain.add_massager(), plain.add_mask())] == [
        massager.serial_number,
        mask.serial_number,
    ]
    async with world:
        on_air = controller_address(massager)
        assert on_air != massager.address
        assert world.device_by_address(on_air) is massager
        assert world.device_by_address(massager.address) is massager
        assert world.peripheral_of(mask).device is mask
        with pytest.raises(RuntimeError, match="before entering"):
            world.add_massager()
