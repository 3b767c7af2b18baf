"""The hand of a scenario: guided by the bridge, or pressing and lifting as scripted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from protocols import Ack, Command, Opcode, ResultCode, SetZone, Zone
from simulators.devices.hand import (
    NO_ZONE,
    ZONE_PRESSURE_BANDS_KPA,
    HandSamples,
    HandState,
    Kpa,
    noise_sigma_kpa,
)
from simulators.devices.massager import SimulatedMassager
from simulators.scenario.spec import (
    GUIDED_LEAD_IN_S,
    GUIDED_NOISE_FLOOR_KPA,
    GUIDED_NOISE_FRACTION,
    HandAction,
)

# --------------------------------------------------------------------------- the hand


class ScenarioHand:
    """A hand that follows the device's zone (the bridge's guidance) unless scripted.

    Guided, it presses in the middle of the band of the zone the device is set to (from
    ``bands_kpa``, else the simulator's zone bands), from ``lead_in_s`` on. Scripted
    actions override it while they last: a press somewhere, a lift, or a recorded profile.
    Times are seconds since the device booted (the scenario's clock, for devices that
    boot with the world).
    """

    def __init__(
        self,
        actions: Sequence[HandAction],
        *,
        guided: bool,
        bands_kpa: Mapping[Zone, tuple[float, float]] | None = None,
        lead_in_s: float = GUIDED_LEAD_IN_S,
        noise_floor_kpa: float = GUIDED_NOISE_FLOOR_KPA,
        noise_fraction: float = GUIDED_NOISE_FRACTION,
    ) -> None:
        self.actions = tuple(sorted(actions, key=lambda a: a.at_s))
        self.guided = guided
        self.bands_kpa = dict(bands_kpa or {})
        self.lead_in_s = lead_in_s
        self.noise_floor_kpa = noise_floor_kpa
        self.noise_fraction = noise_fraction
        # The zone the bridge last set (SET_ZONE): a guided hand goes where it is told.
        self.commanded_zone = Zone.NONE

    def follow(self, device: SimulatedMassager) -> None:
        """Go where the device's SET_ZONE commands say, once its firmware applied them
        (one acknowledged but not applied, by a fault, does not move the hand)."""
        device.command_listeners.append(self.heard)

    def heard(self, command: Command, ack: Ack) -> None:
        """A command the device executed (its command listener)."""
        if ack.result == ResultCode.OK and command.opcode == Opcode.SET_ZONE:
            body = command.body()
            if isinstance(body, SetZone) and isinstance(body.zone, Zone):
                self.commanded_zone = body.zone

    def target_kpa(self, zone: Zone) -> float:
        low, high = self.bands_kpa.get(zone) or ZONE_PRESSURE_BANDS_KPA.get(zone, (0.0, 0.0))
        return (low + high) / 2

    def evaluate(self, times_s: npt.NDArray[np.float64]) -> HandState:
        times = np.asarray(times_s, dtype=np.float64)
        base = self._guided_many((self,), times)
        pressure, zone, touching = base.pressure_kpa[0], base.zone[0], base.touching[0]
        for action in self.actions:
            inside = (times >= action.at_s) & (times < action.end_s)
            if not inside.any():
                continue
            if action.action == "lift":
                pressure[inside] = 0.0
                touching[inside] = False
                if action.zone is not None:
                    zone[inside] = int(action.zone)
            elif action.action == "press":
                fraction = np.clip((times[inside] - action.at_s) / action.duration_s, 0.0, 1.0)
                end_kpa = (
                    action.pressure_from_kpa
                    if action.pressure_to_kpa is None
                    else action.pressure_to_kpa
                )
                pressure[inside] = (
                    action.pressure_from_kpa + (end_kpa - action.pressure_from_kpa) * fraction
                )
                touching[inside] = pressure[inside] > 0
                if action.zone is not None:
                    zone[inside] = int(action.zone)
            else:
                index = np.clip(
                    ((times[inside] - action.at_s) / action.step_s).astype(np.int64),
                    0,
                    len(action.profile_kpa) - 1,
                )
                values = np.asarray(action.profile_kpa)[index]
                pressure[inside] = values
                touching[inside] = values > 0
                if action.profile_zones:
                    zone[inside] = np.asarray([int(z) for z in action.profile_zones])[index]
                elif action.zone is not None:
                    zone[inside] = int(action.zone)
        return HandState(pressure, zone, touching)

    def evaluate_each(self, times_s: Sequence[float]) -> HandSamples:
        """:meth:`evaluate` for a few times (a live tick), in plain lists.

        Between scripted actions the hand is guided or away, which plain floats give for
        less than the numpy calls of :meth:`evaluate`; times that may meet an action (rare)
        go through :meth:`evaluate`, so every value is the same either way.
        """
        count = len(times_s)
        if not count:
            return HandSamples([], [], [])
        first_s, last_s = min(times_s), max(times_s)
        if self.actions and any(a.at_s <= last_s and first_s < a.end_s for a in self.actions):
            state = self.evaluate(np.asarray(times_s, dtype=np.float64))
            return HandSamples(
                state.pressure_kpa.tolist(), state.zone.tolist(), state.touching.tolist()
            )
        zone = self.commanded_zone
        if not self.guided or zone == Zone.NONE:
            return HandSamples([0.0] * count, [NO_ZONE] * count, [False] * count)
        target_kpa = self.target_kpa(zone)
        on = [t_s >= self.lead_in_s for t_s in times_s]
        return HandSamples(
            [target_kpa if o else 0.0 for o in on], [int(zone) if o else NO_ZONE for o in on], on
        )

    @classmethod
    def evaluate_many(
        cls, hands: Sequence[ScenarioHand], times_s: npt.NDArray[np.float64]
    ) -> HandState:
        """Every hand at the same times, in ``(hands, times)`` arrays: a row each.

        Between scripted actions a hand is guided or away, which all hands get together;
        a hand with an action among the times goes through :meth:`evaluate`.
        """
        times = np.asarray(times_s, dtype=np.float64)
        state = cls._guided_many(hands, times)
        if times.shape[0]:
            first_s, last_s = float(times.min()), float(times.max())
            for row, hand in enumerate(hands):
                if any(a.at_s <= last_s and first_s < a.end_s for a in hand.actions):
                    one = hand.evaluate(times)
                    state.pressure_kpa[row] = one.pressure_kpa
                    state.zone[row] = one.zone
                    state.touching[row] = one.touching
        return state

    @staticmethod
    def _guided_many(hands: Sequence[ScenarioHand], times: npt.NDArray[np.float64]) -> HandState:
        """What the hands do without their actions (writable arrays, a row each): from
        the lead-in on, a guided hand presses in the middle of its commanded zone's band."""
        guided = [h.guided and h.commanded_zone != Zone.NONE for h in hands]
        count = times.shape[0]
        if len(hands) == 1:
            # One hand: its values themselves broadcast as a column would, for less.
            (hand,) = hands
            if not guided[0]:
                return HandState(
                    np.zeros((1, count)),
                    np.zeros((1, count), dtype=np.uint8),
                    np.zeros((1, count), dtype=np.bool_),
                )
            on = (times >= hand.lead_in_s).reshape(1, count)
            return HandState(
                np.where(on, hand.target_kpa(hand.commanded_zone), 0.0),
                np.where(on, np.uint8(hand.commanded_zone), np.uint8(Zone.NONE)),
                on,
            )
        on = np.zeros((len(hands), count), dtype=np.bool_)
        if any(guided):
            lead_in_s = np.array([[h.lead_in_s] for h in hands])
            on = (times >= lead_in_s) & np.array([[g] for g in guided])
        targets_kpa = np.array(
            [
                [h.target_kpa(h.commanded_zone) if g else 0.0]
                for h, g in zip(hands, guided, strict=True)
            ]
        )
        zones = np.array([[int(h.commanded_zone)] for h in hands], dtype=np.uint8)
        return HandState(
            np.where(on, targets_kpa, 0.0), np.where(on, zones, np.uint8(Zone.NONE)), on
        )

    def noise_sigma_kpa(self, pressure_kpa: Kpa) -> Kpa:
        return noise_sigma_kpa(self.noise_floor_kpa, self.noise_fraction, pressure_kpa)
