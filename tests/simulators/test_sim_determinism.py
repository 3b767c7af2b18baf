"""One seed per run: same seed, same bytes; another seed, other bytes."""

from __future__ import annotations

from protocols import MassageMode, SetIntensity, SetMode, StartLed
from simulators import SimulatedWorld, VirtualClock

from .conftest import streaming


async def _run(seed: int) -> tuple[list[str], list[bytes]]:
    clock = VirtualClock()
    world = SimulatedWorld(seed=seed, clock=clock)
    devices = [world.add_massager(), world.add_massager(), world.add_mask()]
    links = []
    async with world:
        for device in devices:
            link, command = streaming(device)
            links.append(link)
            if device is devices[2]:
                command(StartLed(30.0, 30.0, 0.0, 60))
            else:
                command(SetIntensity(4))
                command(SetMode(MassageMode.PULSE))
        await clock.advance(30.0)
    identities = [f"{d.address} {d.serial_number} {d.name}" for d in devices]
    return identities, [b"".join(m for _, m in link.messages) for link in links]


async def test_same_seed_same_devices_and_telemetry_bytes() -> None:
    first = await _run(42)
    second = await _run(42)
    assert first == second
    assert all(len(stream) > 10_000 for stream in first[1][:2])


async def test_different_seeds_differ() -> None:
    ids_a, bytes_a = await _run(42)
    ids_b, bytes_b = await _run(43)
    assert set(ids_a).isdisjoint(ids_b)
    assert all(a != b for a, b in zip(bytes_a, bytes_b, strict=True))
