"""What a simulated device keeps over a restart: the previous boot's count, in its BOOT."""

from __future__ import annotations

from protocols import BootEvent, EventCode, ResetReason, ShutdownEvent, ShutdownReason, StartStream
from simulators import HandScript, SimulatedWorld, VirtualClock
from simulators.faults.injector import FaultInjector
from simulators.faults.spec import make_fault

from .conftest import SEED, Commander, RecordingLink


def boots(device: object) -> list[BootEvent]:
    return [
        BootEvent.decode(e.payload)
        for e in device.events  # type: ignore[attr-defined]
        if e.code == EventCode.BOOT
    ]


async def restarted(world: SimulatedWorld, clock: VirtualClock, kind: str) -> tuple[int, list]:
    massager = world.add_massager()
    injector = FaultInjector(massager, seed=SEED, world=world).install()
    injector.add(make_fault(kind, at_s=2.0, down_s=0.5))
    async with world:
        injector.start()
        await clock.advance(3.0)
    ((_, old_end),) = injector.held_before_reboot
    return old_end, boots(massager)


async def test_a_warm_reset_reports_the_old_count(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    old_end, seen = await restarted(world, clock, "reboot")
    assert old_end == 200  # two seconds at 100 Hz
    assert seen == [BootEvent(ResetReason.POWER_ON), BootEvent(ResetReason.SOFTWARE, old_end)]


async def test_a_brownout_loses_the_count_with_the_ram(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    _, seen = await restarted(world, clock, "brownout")
    assert seen == [BootEvent(ResetReason.POWER_ON), BootEvent(ResetReason.BROWN_OUT)]


async def test_an_orderly_power_off_saves_the_count_for_the_next_boot(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager()
    async with world:
        await clock.advance(1.0)
        massager.shutdown()
        end = massager.next_sequence
        (shutdown,) = [e for e in massager.events if e.code == EventCode.SHUTDOWN]
        assert ShutdownEvent.decode(shutdown.payload) == ShutdownEvent(ShutdownReason.BUTTON, end)
        await massager.stop()
        massager.start()
        assert boots(massager)[-1] == BootEvent(ResetReason.POWER_ON, end)
        assert massager.next_sequence == 0


async def test_boot_waits_for_the_hosts_first_command(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager(hand=HandScript.idle())
    async with world:
        await clock.advance(1.0)
        link = RecordingLink()
        massager.attach_link(link)
        await clock.advance(1.0)
        assert link.events() == []  # the host may not have enabled notifications yet
        ack = Commander(massager, link)(StartStream())
        assert ack.ok
        # Right after the acknowledgement, before anything the stream sends.
        (boot,) = link.events()
        assert boot.code == EventCode.BOOT
        assert boot.device_time_ms == 0
        later = [m for _, m in link.messages]
        assert later.index(boot.encode()) == 1
