"""A scenario file: devices, the hand, faults and expectations, checked (``parse_scenario``)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from protocols import Zone
from simulators.devices.device import KIND_LABELS
from simulators.errors import FaultError, ScenarioError
from simulators.faults.spec import Fault, make_fault

DEVICE_KINDS: Final = tuple(KIND_LABELS.values())
HAND_MODES: Final = ("guided", "default", "idle")
HAND_ACTIONS: Final = ("press", "lift", "profile")
DEFAULT_DURATION_S: Final = 60.0
# Longest notification interval a scenario may give a device (its ring holds minutes).
MAX_BATCH_INTERVAL_S: Final = 10.0
# The guided hand puts the head on the skin this long after boot (the bridge connects first).
GUIDED_LEAD_IN_S: Final = 0.5
# A steady hand still wavers a little (domain-safety.md bands are wide; 3 % of the load).
GUIDED_NOISE_FLOOR_KPA: Final = 0.03
GUIDED_NOISE_FRACTION: Final = 0.03

_TOP_KEYS: Final = {"scenario", "devices", "hand", "faults", "expect"}
_SCENARIO_KEYS: Final = {"name", "description", "seed", "duration_s", "routine", "routine_text"}
_DEVICE_KEYS: Final = {
    "name",
    "kind",
    "count",
    "hand",
    "hand_noise",
    "mtu_size",
    "batch_interval_s",
    "battery_percent",
    "worn",
}
_HAND_KEYS: Final = {
    "device",
    "at_s",
    "duration_s",
    "action",
    "zone",
    "pressure_kpa",
    "step_s",
    "zones",
}
_FAULT_SCHEDULE_KEYS: Final = {
    "device",
    "kind",
    "at_s",
    "duration_s",
    "every_s",
    "count",
    "channels",
}


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    label: str
    kind: str
    count: int = 1
    hand: str = "guided"
    mtu_size: int | None = None
    battery_percent: float | None = None
    worn: bool = True
    hand_noise: bool = True  # False: the hand presses exactly (a replay of recorded pressures)
    # How often the device notifies its samples (None: the model's 0.1 s); a real firmware
    # setting, and the lever for large fleets on the virtual clock (fewer, fuller batches).
    batch_interval_s: float | None = None

    def labels(self) -> list[str]:
        """One label per device: ``name`` alone, or ``name-0`` .. ``name-(count-1)``."""
        if self.count == 1:
            return [self.label]
        return [f"{self.label}-{i}" for i in range(self.count)]


@dataclass(frozen=True, slots=True)
class HandAction:
    """A scripted hand action; it overrides the guided hand while it lasts."""

    device: str  # a label, a group name, or "*"
    at_s: float
    duration_s: float
    action: str  # press, lift, profile
    zone: Zone | None = None
    pressure_from_kpa: float = 0.0
    pressure_to_kpa: float | None = None
    step_s: float = 0.1
    profile_kpa: tuple[float, ...] = ()
    profile_zones: tuple[Zone, ...] = ()

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s


@dataclass(frozen=True, slots=True)
class FaultSpec:
    device: str
    fault: Fault


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    duration_s: float
    routine: str | None  # a starter-library name or a path (resolved by the runner)
    routine_text: str | None  # or the routine itself, inline
    devices: tuple[DeviceSpec, ...]
    hand: tuple[HandAction, ...]
    faults: tuple[FaultSpec, ...]
    expect: tuple[Mapping[str, Any], ...]
    source_text: str = ""
    path: Path | None = None

    def labels(self) -> list[str]:
        return [label for spec in self.devices for label in spec.labels()]

    def spec_of(self, label: str) -> DeviceSpec:
        for spec in self.devices:
            if label in spec.labels():
                return spec
        raise KeyError(label)


def selects(selector: str, label: str, group: str) -> bool:
    """Whether a ``device`` selector names ``label`` (by label, its group, or ``*``)."""
    return selector in ("*", label, group)


# --------------------------------------------------------------------------- parsing


def load_scenario(path: Path | str) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ScenarioError(str(path), [f"cannot read: {exc.strerror or exc}"]) from exc
    return parse_scenario(text, label=str(path), path=path)


def parse_scenario(text: str, *, label: str = "<scenario>", path: Path | None = None) -> Scenario:
    """Parse and check a scenario; raises :class:`ScenarioError` listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(label, [f"not valid TOML: {exc}"]) from exc
    problems: list[str] = []
    for key in data.keys() - _TOP_KEYS:
        problems.append(f"unknown top-level key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    head = _table(data.get("scenario", {}), "[scenario]", problems)
    _unknown(head, _SCENARIO_KEYS, "[scenario]", problems)
    name = str(head.get("name", path.stem if path else "scenario"))
    seed = _number(head, "seed", "[scenario]", problems, default=0, integer=True, minimum=0)
    duration_s = _number(
        head, "duration_s", "[scenario]", problems, default=DEFAULT_DURATION_S, positive=True
    )
    routine = head.get("routine")
    routine_text = head.get("routine_text")
    if routine is not None and routine_text is not None:
        problems.append("[scenario]: give routine or routine_text, not both")

    devices: list[DeviceSpec] = []
    for index, raw in enumerate(_array(data.get("devices", []), "[[devices]]", problems)):
        where = f"[[devices]] #{index + 1}"
        entry = _table(raw, where, problems)
        _unknown(entry, _DEVICE_KEYS, where, problems)
        kind = entry.get("kind", "massager")
        if kind not in DEVICE_KINDS:
            problems.append(f"{where}: kind must be one of {', '.join(DEVICE_KINDS)}, got {kind!r}")
        hand = entry.get("hand", "guided")
        if hand not in HAND_MODES:
            problems.append(f"{where}: hand must be one of {', '.join(HAND_MODES)}, got {hand!r}")
        count = _number(entry, "count", where, problems, default=1, integer=True, minimum=1)
        mtu = entry.get("mtu_size")
        if mtu is not None and (not isinstance(mtu, int) or mtu < 23):
            problems.append(f"{where}: mtu_size must be an integer of at least 23")
        batch_interval_s = _number(
            entry, "batch_interval_s", where, problems, default=None, positive=True
        )
        if batch_interval_s is not None and batch_interval_s > MAX_BATCH_INTERVAL_S:
            problems.append(
                f"{where}: batch_interval_s must be at most {MAX_BATCH_INTERVAL_S:g} s"
                f", got {batch_interval_s!r}"
            )
        battery = entry.get("battery_percent")
        if battery is not None and not (isinstance(battery, int | float) and 0 < battery <= 100):
            problems.append(f"{where}: battery_percent must be in (0, 100]")
        devices.append(
            DeviceSpec(
                str(entry.get("name", f"{kind}{index}")),
                str(kind),
                int(count),
                str(hand),
                mtu,
                None if battery is None else float(battery),
                bool(entry.get("worn", True)),
                bool(entry.get("hand_noise", True)),
                None if batch_interval_s is None else float(batch_interval_s),
            )
        )
    if not devices:
        problems.append("no [[devices]]: a scenario needs at least one device")
    names = [d.label for d in devices]
    for name_ in set(names):
        if names.count(name_) > 1:
            problems.append(f"[[devices]]: the name {name_!r} is used twice")
    selectors = {"*", *names, *(label for d in devices for label in d.labels())}

    hand_actions: list[HandAction] = []
    for index, raw in enumerate(_array(data.get("hand", []), "[[hand]]", problems)):
        where = f"[[hand]] #{index + 1}"
        entry = _table(raw, where, problems)
        _unknown(entry, _HAND_KEYS, where, problems)
        action = _hand_action(entry, where, problems, selectors)
        if action is not None:
            hand_actions.append(action)

    faults: list[FaultSpec] = []
    for index, raw in enumerate(_array(data.get("faults", []), "[[faults]]", problems)):
        where = f"[[faults]] #{index + 1}"
        entry = dict(_table(raw, where, problems))
        device = str(entry.pop("device", "*"))
        if device not in selectors:
            problems.append(f"{where}: device {device!r} is not a device of this scenario")
        if "kind" not in entry:
            problems.append(f"{where}: kind is missing")
            continue
        schedule = {k: entry.pop(k) for k in list(entry) if k in _FAULT_SCHEDULE_KEYS}
        try:
            fault = make_fault(where=where, **schedule, **entry)
        except (FaultError, TypeError) as exc:
            problems.append(str(exc))
            continue
        faults.append(FaultSpec(device, fault))

    raw_expect = data.get("expect", [])
    if isinstance(raw_expect, dict):
        raw_expect = [raw_expect]
    expect: list[Mapping[str, Any]] = []
    for index, raw in enumerate(_array(raw_expect, "[[expect]]", problems)):
        where = f"[[expect]] #{index + 1}"
        entry = _table(raw, where, problems)
        device = str(entry.get("device", "*"))
        if device not in selectors:
            problems.append(f"{where}: device {device!r} is not a device of this scenario")
        expect.append(entry)

    if problems:
        raise ScenarioError(label, problems)
    return Scenario(
        name,
        str(head.get("description", "")),
        int(seed),
        float(duration_s),
        None if routine is None else str(routine),
        None if routine_text is None else str(routine_text),
        tuple(devices),
        tuple(hand_actions),
        tuple(faults),
        tuple(expect),
        text,
        path,
    )


def _hand_action(
    entry: Mapping[str, Any], where: str, problems: list[str], selectors: set[str]
) -> HandAction | None:
    device = str(entry.get("device", "*"))
    if device not in selectors:
        problems.append(f"{where}: device {device!r} is not a device of this scenario")
    action = entry.get("action", "press")
    if action not in HAND_ACTIONS:
        problems.append(f"{where}: action must be one of {', '.join(HAND_ACTIONS)}")
        return None
    at_s = _number(entry, "at_s", where, problems, default=0.0, minimum=0)
    zone = _zone(entry.get("zone"), where, problems) if "zone" in entry else None
    if action == "profile":
        step_s = _number(entry, "step_s", where, problems, default=0.1, positive=True)
        raw = entry.get("pressure_kpa")
        if not isinstance(raw, list) or not raw:
            problems.append(f"{where}: a profile needs pressure_kpa = [ ... ] (one value a step)")
            return None
        values = tuple(float(v) for v in raw)
        zones_raw = entry.get("zones", [])
        zones = tuple(_zone(z, where, problems) or Zone.NONE for z in zones_raw)
        if zones and len(zones) != len(values):
            problems.append(f"{where}: zones has {len(zones)} entries, pressure_kpa {len(values)}")
        return HandAction(
            device,
            float(at_s),
            step_s * len(values),
            "profile",
            zone,
            step_s=float(step_s),
            profile_kpa=values,
            profile_zones=zones,
        )
    duration_s = _number(entry, "duration_s", where, problems, default=None, positive=True)
    if duration_s is None:
        problems.append(f"{where}: duration_s is missing")
        return None
    pressure = entry.get("pressure_kpa", 0.0 if action == "lift" else None)
    if action == "lift":
        return HandAction(device, float(at_s), float(duration_s), "lift", zone)
    if isinstance(pressure, list) and len(pressure) == 2:
        start, end = float(pressure[0]), float(pressure[1])
    elif isinstance(pressure, int | float):
        start, end = float(pressure), None
    else:
        problems.append(f"{where}: pressure_kpa must be a number or [from, to]")
        return None
    if start < 0 or (end is not None and end < 0):
        problems.append(f"{where}: pressure cannot be negative")
    return HandAction(device, float(at_s), float(duration_s), "press", zone, start, end)


def _zone(value: Any, where: str, problems: list[str]) -> Zone | None:
    if isinstance(value, str) and value.upper() in Zone.__members__:
        return Zone[value.upper()]
    problems.append(f"{where}: unknown zone {value!r}")
    return None


def _table(value: Any, where: str, problems: list[str]) -> Mapping[str, Any]:
    if isinstance(value, dict):
        return value
    problems.append(f"{where}: expected a table")
    return {}


def _array(value: Any, where: str, problems: list[str]) -> list[Any]:
    if isinstance(value, list):
        return value
    problems.append(f"{where}: expected an array of tables")
    return []


def _unknown(entry: Mapping[str, Any], known: set[str], where: str, problems: list[str]) -> None:
    for key in sorted(entry.keys() - known):
        problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")


def _number(
    entry: Mapping[str, Any],
    key: str,
    where: str,
    problems: list[str],
    *,
    default: Any,
    integer: bool = False,
    positive: bool = False,
    minimum: float | None = None,
) -> Any:
    value = entry.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{where}: {key} must be a number, got {value!r}")
        return default
    if integer and not isinstance(value, int):
        problems.append(f"{where}: {key} must be an integer, got {value!r}")
        return default
    if positive and value <= 0:
        problems.append(f"{where}: {key} must be positive, got {value!r}")
        return default
    if minimum is not None and value < minimum:
        problems.append(f"{where}: {key} must be at least {minimum:g}, got {value!r}")
        return default
    return value
