"""A scenario built into a simulated world: its devices, hands and fault injectors."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from protocols import Zone
from simulators.devices.device import SimulatedDevice
from simulators.faults.injector import FaultInjector
from simulators.faults.spec import FaultRecord
from simulators.scenario.hand import ScenarioHand
from simulators.scenario.spec import Scenario, selects
from simulators.world import SimulatedWorld

# --------------------------------------------------------------------------- building


@dataclass
class BuiltDevice:
    label: str
    group: str
    device: SimulatedDevice
    injector: FaultInjector


@dataclass
class BuiltScenario:
    scenario: Scenario
    world: SimulatedWorld
    devices: list[BuiltDevice] = field(default_factory=list)
    fault_records: list[FaultRecord] = field(default_factory=list)

    def start_faults(self) -> None:
        """Start every device's fault schedule (inside the running loop, world started)."""
        for built in self.devices:
            built.injector.start()


def build_scenario(
    scenario: Scenario,
    world: SimulatedWorld,
    *,
    bands_kpa: Mapping[Zone, tuple[float, float]] | None = None,
    on_record: Callable[[FaultRecord], None] | None = None,
    only: Collection[str] | None = None,
) -> BuiltScenario:
    """Add the scenario's devices to ``world`` with their hands and faults installed.

    ``bands_kpa``: the pressure the guided hand aims for per zone (a routine's step bands).
    ``on_record``: called with every fault record as it happens.
    ``only``: build just these labels (a shard of the fleet). Each device keeps the index
    of its place in the whole scenario, so its identity, noise and fault schedule are those
    it has when every device is built.
    """
    built = BuiltScenario(scenario, world)
    if only is not None:
        unknown = set(only) - set(scenario.labels())
        if unknown:
            raise ValueError(f"no device(s) {', '.join(sorted(unknown))} in {scenario.name!r}")
    index = -1

    def record(entry: FaultRecord) -> None:
        built.fault_records.append(entry)
        if on_record is not None:
            on_record(entry)

    for spec in scenario.devices:
        for label in spec.labels():
            index += 1
            if only is not None and label not in only:
                continue
            options: dict[str, Any] = {"index": index}
            if spec.mtu_size is not None:
                options["mtu_size"] = spec.mtu_size
            if spec.batch_interval_s is not None:
                options["batch_interval_s"] = spec.batch_interval_s
            if spec.battery_percent is not None:
                options["battery_percent"] = spec.battery_percent
            device: SimulatedDevice
            if spec.kind == "massager":
                actions = [a for a in scenario.hand if selects(a.device, label, spec.label)]
                if spec.hand == "default" and not actions:
                    device = world.add_massager(**options)
                else:
                    noise = (
                        {} if spec.hand_noise else {"noise_floor_kpa": 0.0, "noise_fraction": 0.0}
                    )
                    hand = ScenarioHand(
                        actions, guided=spec.hand == "guided", bands_kpa=bands_kpa, **noise
                    )
                    massager = world.add_massager(hand=hand, **options)  # type: ignore[arg-type]
                    hand.follow(massager)
                    device = massager
            else:
                device = world.add_mask(worn=spec.worn, **options)
            faults = [f.fault for f in scenario.faults if selects(f.device, label, spec.label)]
            injector = FaultInjector(
                device,
                seed=world.seed,
                world=world,
                faults=faults,
                on_record=record,
            ).install()
            built.devices.append(BuiltDevice(label, spec.label, device, injector))
    return built
