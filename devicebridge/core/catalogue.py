"""The device catalogue: one declarative TOML file per device family.

Pure: :func:`build_catalogue` turns family files (``devicebridge/data/devices/*.toml``, and
those of the ``device_catalogue_dir`` setting) into a frozen :class:`DeviceCatalogue`, or
raises :class:`~devicebridge.errors.CatalogueError` listing every problem with its file,
key path and line, as the policy reader does. A family file says how to recognise the
family's devices in advertisements (service UUIDs, manufacturer ids, advertised names),
which driver speaks their wire and through which GATT attributes, what each kind of device
can do and measure, and how a device is identified (``docs/devices.md`` has the format).

What a device can do is one :class:`KindSupport`, whether it comes from a catalogue file
(scan, ``routine validate --family``) or from a connected device's profile
(:func:`support_from_capabilities`): the routine checks and the session record speak of one
thing.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Final

from devicebridge.core.policy import LED_CHANNELS
from devicebridge.core.routine import MASSAGE_MODES, DeviceKindName
from devicebridge.core.tomlpath import Problem, locate, number_problem, show
from devicebridge.errors import CatalogueError
from protocols import (
    BATTERY_LEVEL_CHAR_UUID,
    BATTERY_SERVICE_UUID,
    CONTROL_CHAR_UUID,
    DEVICE_INFORMATION_SERVICE_UUID,
    DEVICE_PROFILE_CHAR_UUID,
    EVENTS_CHAR_UUID,
    FACIAL_CARE_SERVICE_UUID,
    PROGRAM_CHAR_UUID,
    TELEMETRY_CHAR_UUID,
    Capability,
    DeviceKind,
)
from protocols.constants import MAX_INTENSITY_LEVEL
from protocols.foreo import MAX_MODE_BYTE, MAX_SPEED

# What a device may measure and report. Battery is reported by nearly everything; the
# others decide which checks of a routine can run on the device.
PRESSURE: Final = "pressure"
CONTACT: Final = "contact"
SKIN_TEMPERATURE: Final = "skin_temperature"
IRRADIANCE: Final = "irradiance"
BATTERY: Final = "battery"
MEASUREMENTS: Final = (PRESSURE, CONTACT, SKIN_TEMPERATURE, IRRADIANCE, BATTERY)
# Largest intensity step a catalogue may declare (a one-byte field on every wire we know).
MAX_DEVICE_INTENSITY: Final = 255
_FAMILY_ID: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_UUID: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TOP_KEYS: Final = frozenset({"family", "match", "gatt", "kinds", "models"})
_FAMILY_KEYS: Final = frozenset({"id", "name", "driver", "identity", "verified", "source", "notes"})
_MATCH_KEYS: Final = frozenset({"service_uuids", "manufacturer_ids"})
_KIND_KEYS: Final = frozenset({"intensity", "modes", "measures", "led_channels", "programs"})
_MODEL_KEYS: Final = frozenset({"name", "kind", "names", "name_patterns"})
# A BLE advertised name is at most 248 bytes (GAP); a sane name is far shorter.
MAX_NAME_CHARS: Final = 64
MAX_MANUFACTURER_ID: Final = 0xFFFF


class IdentityRule(StrEnum):
    """How a paired device of the family is recognised again (``docs/devices.md``)."""

    SERIAL = "serial"  # the serial number it advertises or exposes
    ADDRESS = "address"  # none exposed: "<family>@<address>" (see device_identity)


@dataclass(frozen=True, slots=True)
class KindSupport:
    """What one kind of device of a family can do and measure.

    ``intensity_min..intensity_max`` are the device's own steps (0 is off); a routine's
    levels 1-10 are mapped onto them by the driver (``docs/devices.md``, "Intensity").
    """

    kind: DeviceKindName
    intensity_min: int = 0
    intensity_max: int = 0
    modes: tuple[str, ...] = ()
    measures: frozenset[str] = frozenset()
    led_channels: tuple[str, ...] = ()
    programs: bool = False

    @property
    def senses_skin(self) -> bool:
        """Pressure and contact: what a step timed by contact needs."""
        return PRESSURE in self.measures and CONTACT in self.measures

    def describe(self) -> str:
        """One line for ``scan``: what it drives, what it measures, what it lacks."""
        parts: list[str] = []
        if self.kind is DeviceKindName.MASSAGER:
            parts.append(f"{'/'.join(self.modes)} {self.intensity_min}-{self.intensity_max}")
        else:
            parts.append("LED " + "/".join(c.replace("_", "-") for c in self.led_channels))
        shown = [m.replace("_", " ") for m in MEASUREMENTS if m in self.measures]
        parts.append("measures " + (", ".join(shown) if shown else "nothing"))
        missing = [
            m.replace("_", " ")
            for m in (PRESSURE, CONTACT, SKIN_TEMPERATURE)
            if m not in self.measures and self.kind is DeviceKindName.MASSAGER
        ]
        if missing:
            parts.append("no " + ", ".join(missing))
        parts.append("device programs" if self.programs else "no device programs")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """One model of a family: the names it advertises and the driver's options for it."""

    name: str
    kind: DeviceKindName
    names: tuple[str, ...] = ()
    name_patterns: tuple[str, ...] = ()  # shell-style, case-sensitive (fnmatchcase)
    options: Mapping[str, int] = field(default_factory=dict)

    def matches_name(self, advertised: str) -> bool:
        return advertised in self.names or any(
            fnmatch.fnmatchcase(advertised, pattern) for pattern in self.name_patterns
        )


@dataclass(frozen=True)
class DeviceFamily:
    """One catalogue file."""

    id: str
    name: str
    driver: str
    identity: IdentityRule
    verified: bool
    source: str
    label: str  # the file it came from, for messages
    service_uuids: tuple[str, ...] = ()
    manufacturer_ids: tuple[int, ...] = ()
    gatt: Mapping[str, str] = field(default_factory=dict)
    kinds: Mapping[DeviceKindName, KindSupport] = field(default_factory=dict)
    models: tuple[DeviceModel, ...] = ()
    notes: str = ""

    def model_for_name(self, advertised: str) -> DeviceModel | None:
        """The model advertising this name: exact names first, then patterns."""
        for model in self.models:
            if advertised in model.names:
                return model
        for model in self.models:
            if model.matches_name(advertised):
                return model
        return None

    def support(self, kind: DeviceKindName | None) -> KindSupport | None:
        if kind is None:
            return next(iter(self.kinds.values())) if len(self.kinds) == 1 else None
        return self.kinds.get(kind)


@dataclass(frozen=True, slots=True)
class CatalogueMatch:
    """An advertisement recognised: its family, and its model when the name says which."""

    family: DeviceFamily
    model: DeviceModel | None = None

    @property
    def kind(self) -> DeviceKindName | None:
        if self.model is not None:
            return self.model.kind
        return next(iter(self.family.kinds)) if len(self.family.kinds) == 1 else None

    @property
    def support(self) -> KindSupport | None:
        return self.family.support(self.kind)


@dataclass(frozen=True)
class DeviceCatalogue:
    families: tuple[DeviceFamily, ...]

    def family(self, family_id: str) -> DeviceFamily | None:
        return next((f for f in self.families if f.id == family_id), None)

    def match(
        self,
        name: str | None,
        service_uuids: Iterable[str] = (),
        manufacturer_ids: Iterable[int] = (),
    ) -> CatalogueMatch | None:
        """The family (and model) of an advertisement, or None (not a catalogued device).

        A service UUID or manufacturer id the family declares is evidence of its protocol
        and wins over a name; names then pick the model within the family.
        """
        services = {uuid.lower() for uuid in service_uuids}
        manufacturers = set(manufacturer_ids)
        for family in self.families:
            if services & set(family.service_uuids) or manufacturers & set(family.manufacturer_ids):
                model = family.model_for_name(name) if name else None
                return CatalogueMatch(family, model)
        if not name:
            return None
        for family in self.families:
            model = family.model_for_name(name)
            if model is not None:
                return CatalogueMatch(family, model)
        return None


def device_identity(family: DeviceFamily, serial_number: str | None, address: str) -> str:
    """What the registry knows a device by: its serial number when the family exposes one,
    else ``<family>@<address>`` (on macOS the address is the UUID CoreBluetooth gives the
    device, stable on that Mac only: ``docs/devices.md``, "Identity")."""
    if family.identity is IdentityRule.SERIAL and serial_number:
        return serial_number
    return f"{family.id}@{address}"


# --------------------------------------------------------------------------- intensity


def device_intensity(support: KindSupport, level: int) -> int:
    """The device's own step for a routine level (0 off, 1-10): ``level`` tenths of the
    device's range, rounded, never 0 for a level above 0 and never above the device's top.
    On a 0-10 device (OFCP, FOREO) a level is its own step."""
    if level <= 0:
        return support.intensity_min
    top = support.intensity_max
    step = (level * top + MAX_INTENSITY_LEVEL // 2) // MAX_INTENSITY_LEVEL  # halves up
    return max(1, min(top, step))


# --------------------------------------------------------------------------- capabilities

_MEASURE_FLAGS: Final = {
    PRESSURE: Capability.PRESSURE_SENSOR,
    CONTACT: Capability.CONTACT_SENSOR,
    SKIN_TEMPERATURE: Capability.SKIN_TEMPERATURE,
}
_MODE_FLAGS: Final = {"vibration": Capability.VIBRATION, "percussion": Capability.PERCUSSION}
_LED_FLAGS: Final = {
    "red": Capability.LED_RED,
    "near_infrared": Capability.LED_NEAR_INFRARED,
    "blue": Capability.LED_BLUE,
}
_KIND_OF_WIRE: Final = {
    DeviceKind.MASSAGER: DeviceKindName.MASSAGER,
    DeviceKind.LED_MASK: DeviceKindName.LED_MASK,
}
WIRE_KIND: Final = {name: wire for wire, name in _KIND_OF_WIRE.items()}


def capabilities_of(support: KindSupport) -> Capability:
    """The profile capability flags of ``support`` (what a non-OFCP driver reports)."""
    flags = Capability(0)
    for what, flag in _MEASURE_FLAGS.items():
        if what in support.measures:
            flags |= flag
    for mode, flag in _MODE_FLAGS.items():
        if mode in support.modes:
            flags |= flag
    for channel in support.led_channels:
        flags |= _LED_FLAGS[channel]
    if support.programs:
        flags |= Capability.PROGRAM_TRANSFER
    return flags


def support_from_capabilities(
    kind: DeviceKind | int, capabilities: int, *, intensity_max: int = MAX_SPEED
) -> KindSupport | None:
    """What a connected device can do, from its profile (None: a kind we do not know).

    OFCP has no flag for the pulse mode: a device with vibration has it (the simulated and
    specified firmware pulse the vibration motor).
    """
    name = _KIND_OF_WIRE.get(DeviceKind(kind)) if kind in tuple(DeviceKind) else None
    if name is None:
        return None
    caps = Capability(capabilities)
    measures = {what for what, flag in _MEASURE_FLAGS.items() if caps & flag}
    measures.add(BATTERY)
    led = tuple(ch for ch in LED_CHANNELS if caps & _LED_FLAGS[ch])
    if led:
        measures.add(IRRADIANCE)
    modes = tuple(m for m, flag in _MODE_FLAGS.items() if caps & flag)
    if "vibration" in modes:
        modes = (*modes, "pulse")
    return KindSupport(
        name,
        0,
        intensity_max if name is DeviceKindName.MASSAGER else 0,
        modes,
        frozenset(measures),
        led,
        bool(caps & Capability.PROGRAM_TRANSFER),
    )


# --------------------------------------------------------------------------- drivers


@dataclass(frozen=True, slots=True)
class DriverSchema:
    """What a driver needs from a family file and what it can deliver.

    ``fixed_gatt``: the attributes a driver's protocol defines itself (a family file must
    state them as they are); otherwise the file's ``[gatt]`` table configures the driver.
    """

    gatt_roles: tuple[str, ...]
    kinds: frozenset[DeviceKindName]
    model_options: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    fixed_gatt: Mapping[str, str] | None = None
    measures: frozenset[str] = frozenset(MEASUREMENTS)
    modes: frozenset[str] = frozenset(MASSAGE_MODES)
    max_intensity: int = MAX_DEVICE_INTENSITY
    programs: bool = True
    identities: frozenset[IdentityRule] = frozenset(IdentityRule)


OFCP_GATT: Final = {
    "service": FACIAL_CARE_SERVICE_UUID,
    "profile": DEVICE_PROFILE_CHAR_UUID,
    "control": CONTROL_CHAR_UUID,
    "telemetry": TELEMETRY_CHAR_UUID,
    "events": EVENTS_CHAR_UUID,
    "program": PROGRAM_CHAR_UUID,
    "battery_service": BATTERY_SERVICE_UUID,
    "battery_level": BATTERY_LEVEL_CHAR_UUID,
    "device_information": DEVICE_INFORMATION_SERVICE_UUID,
}
OFCP_DRIVER: Final = "ofcp"
FOREO_DRIVER: Final = "foreo"
# The family of devices paired before the catalogue existed, and of OFCP advertisements.
OFCP_FAMILY: Final = "ofcp"
DRIVERS: Final[Mapping[str, DriverSchema]] = {
    # devicebridge's own profile (docs/protocol.md), over BLE and serial.
    OFCP_DRIVER: DriverSchema(
        tuple(OFCP_GATT),
        frozenset(DeviceKindName),
        fixed_gatt=OFCP_GATT,
        max_intensity=10,
        identities=frozenset({IdentityRule.SERIAL}),
    ),
    # One vibration output written as [0x01, mode, speed] (protocols/foreo.py).
    FOREO_DRIVER: DriverSchema(
        ("service", "control", "battery_service", "battery_level"),
        frozenset({DeviceKindName.MASSAGER}),
        model_options={"mode": (0, MAX_MODE_BYTE)},
        measures=frozenset({BATTERY}),
        modes=frozenset({"vibration"}),
        max_intensity=MAX_SPEED,
        programs=False,
    ),
}


# --------------------------------------------------------------------------- reading


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message, locate(self.text, path)))

    def table(self, data: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
        value = data.get(key)
        if value is None:
            self.add(path, "missing table")
            return {}
        if not isinstance(value, dict):
            self.add(path, f"must be a table, got {show(value)}")
            return {}
        return value

    def unknown(self, table: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
        for key in sorted(set(table) - allowed):
            where = f"{path}.{key}" if path else key
            self.add(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def text_value(self, table: Mapping[str, Any], key: str, path: str) -> str:
        value = table.get(key)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if value is None else f"must be a non-empty string, got {show(value)}"
            self.add(f"{path}.{key}", got)
            return ""
        return value

    def strings(self, table: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        value = table.get(key, [])
        where = f"{path}.{key}"
        if not isinstance(value, list):
            self.add(where, f"must be a list of strings, got {show(value)}")
            return ()
        out: list[str] = []
        for item in value:
            if not isinstance(item, str) or not item.strip():
                self.add(where, f"must hold non-empty strings, got {show(item)}")
            elif len(item) > MAX_NAME_CHARS:
                self.add(where, f"{show(item)} is longer than {MAX_NAME_CHARS} characters")
            elif item in out:
                self.add(where, f"{show(item)} is listed twice")
            else:
                out.append(item)
        return tuple(out)

    def choices(
        self, table: Mapping[str, Any], key: str, path: str, allowed: Sequence[str]
    ) -> tuple[str, ...]:
        chosen = self.strings(table, key, path)
        for item in chosen:
            if item not in allowed:
                self.add(f"{path}.{key}", f"unknown {show(item)}; known: {', '.join(allowed)}")
        return tuple(item for item in chosen if item in allowed)

    def flag(self, table: Mapping[str, Any], key: str, path: str) -> bool:
        value = table.get(key)
        if not isinstance(value, bool):
            got = "missing" if value is None else f"must be true or false, got {show(value)}"
            self.add(f"{path}.{key}", got)
            return False
        return value

    def whole(self, value: object, path: str, low: int, high: int) -> int | None:
        problem = "missing" if value is None else number_problem(value, low, high, whole=True)
        if problem is not None:
            self.add(path, problem)
            return None
        assert isinstance(value, int)
        return value


def parse_family(text: str, *, label: str) -> DeviceFamily:
    """One family file; raise :class:`CatalogueError` naming every problem in it."""
    family, problems = _parse_family(text, label)
    if problems or family is None:
        raise CatalogueError([(label, p) for p in problems])
    return family


def _parse_family(text: str, label: str) -> tuple[DeviceFamily | None, list[Problem]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [Problem("(file)", f"not valid TOML: {exc}")]
    read = _Reader(text)
    read.unknown(data, _TOP_KEYS, "")
    if not isinstance(data.get("family"), dict):
        # Not a family file at all: what else it lacks would only repeat that.
        read.add(
            "family",
            "missing table: a family file starts with [family] "
            "(id, name, driver, identity, verified, source)",
        )
        return None, read.problems
    head = read.table(data, "family", "family")
    read.unknown(head, _FAMILY_KEYS, "family")
    family_id = head.get("id")
    stem = label.rsplit("/", 1)[-1].removesuffix(".toml")
    if not isinstance(family_id, str) or not _FAMILY_ID.match(family_id):
        read.add(
            "family.id",
            "must be lower-case letters, digits and _ (starting with a letter), "
            f"got {show(family_id)}",
        )
        family_id = ""
    elif family_id != stem:
        read.add("family.id", f"{show(family_id)} must be the file's name ({stem}.toml)")
    name = read.text_value(head, "name", "family")
    source = read.text_value(head, "source", "family")
    notes = head.get("notes", "")
    if not isinstance(notes, str):
        read.add("family.notes", f"must be a string, got {show(notes)}")
        notes = ""
    verified = read.flag(head, "verified", "family")
    driver_id = head.get("driver")
    driver = DRIVERS.get(driver_id) if isinstance(driver_id, str) else None
    if driver is None:
        read.add(
            "family.driver",
            f"unknown driver {show(driver_id)}; known: {', '.join(sorted(DRIVERS))}",
        )
    identity_raw = head.get("identity")
    identity = IdentityRule.ADDRESS
    if identity_raw not in tuple(IdentityRule):
        read.add(
            "family.identity",
            f'must be "serial" or "address", got {show(identity_raw)}',
        )
    else:
        identity = IdentityRule(identity_raw)
        if driver is not None and identity not in driver.identities:
            allowed = " or ".join(f'"{i.value}"' for i in sorted(driver.identities))
            read.add("family.identity", f"the {driver_id} driver identifies devices by {allowed}")

    match = data.get("match", {})
    if not isinstance(match, dict):
        read.add("match", f"must be a table, got {show(match)}")
        match = {}
    read.unknown(match, _MATCH_KEYS, "match")
    service_uuids = _uuids(read, match.get("service_uuids", []), "match.service_uuids")
    manufacturer_ids = _manufacturer_ids(read, match.get("manufacturer_ids", []))

    gatt = _gatt(read, data, driver)
    kinds = _kinds(read, data, driver)
    models = _models(read, data, driver, kinds)
    if not service_uuids and not manufacturer_ids and not models:
        read.add(
            "match",
            "nothing recognises the family's devices: give match.service_uuids, "
            "match.manufacturer_ids or [[models]] with names",
        )
    if read.problems:
        return None, read.problems
    assert isinstance(driver_id, str)
    return (
        DeviceFamily(
            id=family_id,
            name=name,
            driver=driver_id,
            identity=identity,
            verified=verified,
            source=source,
            label=label,
            service_uuids=service_uuids,
            manufacturer_ids=manufacturer_ids,
            gatt=gatt,
            kinds=kinds,
            models=models,
            notes=notes,
        ),
        [],
    )


def _uuids(read: _Reader, value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        read.add(path, f"must be a list of UUID strings, got {show(value)}")
        return ()
    out: list[str] = []
    for item in value:
        uuid = item.lower() if isinstance(item, str) else None
        if uuid is None or not _UUID.match(uuid):
            read.add(path, f"{show(item)} is not a 128-bit UUID (xxxxxxxx-xxxx-...)")
        else:
            out.append(uuid)
    return tuple(out)


def _manufacturer_ids(read: _Reader, value: object) -> tuple[int, ...]:
    path = "match.manufacturer_ids"
    if not isinstance(value, list):
        read.add(path, f"must be a list of company identifiers, got {show(value)}")
        return ()
    out: list[int] = []
    for item in value:
        number = read.whole(item, path, 0, MAX_MANUFACTURER_ID)
        if number is not None:
            out.append(number)
    return tuple(out)


def _gatt(read: _Reader, data: Mapping[str, Any], driver: DriverSchema | None) -> dict[str, str]:
    table = read.table(data, "gatt", "gatt")
    if driver is None:
        return {}
    read.unknown(table, frozenset(driver.gatt_roles), "gatt")
    gatt: dict[str, str] = {}
    for role in driver.gatt_roles:
        path = f"gatt.{role}"
        value = table.get(role)
        uuid = value.lower() if isinstance(value, str) else None
        if uuid is None or not _UUID.match(uuid):
            got = "missing" if value is None else f"{show(value)} is not a 128-bit UUID"
            read.add(path, got)
            continue
        if driver.fixed_gatt is not None and uuid != driver.fixed_gatt[role]:
            read.add(
                path,
                f"{uuid} is not what the driver's protocol defines ({driver.fixed_gatt[role]})",
            )
            continue
        gatt[role] = uuid
    return gatt


def _kinds(
    read: _Reader, data: Mapping[str, Any], driver: DriverSchema | None
) -> dict[DeviceKindName, KindSupport]:
    table = read.table(data, "kinds", "kinds")
    kinds: dict[DeviceKindName, KindSupport] = {}
    if not table and "kinds" in data:
        read.add("kinds", "declares no kind of device ([kinds.massager] or [kinds.led_mask])")
    for raw_kind, entry in table.items():
        path = f"kinds.{raw_kind}"
        if raw_kind not in tuple(DeviceKindName):
            read.add(path, f"unknown kind; known: {', '.join(DeviceKindName)}")
            continue
        kind = DeviceKindName(raw_kind)
        if driver is not None and kind not in driver.kinds:
            read.add(path, f"the driver drives {', '.join(sorted(driver.kinds))} only")
        if not isinstance(entry, dict):
            read.add(path, f"must be a table, got {show(entry)}")
            continue
        read.unknown(entry, _KIND_KEYS, path)
        modes = read.choices(entry, "modes", path, MASSAGE_MODES)
        measures = read.choices(entry, "measures", path, MEASUREMENTS)
        led = read.choices(entry, "led_channels", path, LED_CHANNELS)
        programs = read.flag(entry, "programs", path)
        low = high = 0
        intensity = entry.get("intensity")
        if kind is DeviceKindName.MASSAGER:
            if not isinstance(intensity, dict):
                read.add(f"{path}.intensity", "missing: intensity = { min = 0, max = ... }")
            else:
                read.unknown(intensity, frozenset({"min", "max"}), f"{path}.intensity")
                top = driver.max_intensity if driver else MAX_DEVICE_INTENSITY
                low = read.whole(intensity.get("min"), f"{path}.intensity.min", 0, 0) or 0
                high = read.whole(intensity.get("max"), f"{path}.intensity.max", 1, top) or 0
            if not modes:
                read.add(f"{path}.modes", "a massager needs at least one mode")
            if led:
                read.add(f"{path}.led_channels", "a massager has no LED channels")
        else:
            if intensity is not None:
                read.add(f"{path}.intensity", "an LED mask has no motor intensity")
            if modes:
                read.add(f"{path}.modes", "an LED mask has no massage modes")
            if not led:
                read.add(f"{path}.led_channels", "an LED mask needs at least one channel")
        if driver is not None:
            for what in sorted(set(measures) - driver.measures):
                read.add(f"{path}.measures", f"the driver cannot report {what}")
            for mode in sorted(set(modes) - driver.modes):
                read.add(f"{path}.modes", f"the driver cannot run {mode}")
            if programs and not driver.programs:
                read.add(f"{path}.programs", "the driver cannot install device programs")
        kinds[kind] = KindSupport(kind, low, high, modes, frozenset(measures), led, programs)
    return kinds


def _models(
    read: _Reader,
    data: Mapping[str, Any],
    driver: DriverSchema | None,
    kinds: Mapping[DeviceKindName, KindSupport],
) -> tuple[DeviceModel, ...]:
    raw = data.get("models", [])
    if not isinstance(raw, list):
        read.add("models", "must be [[models]] tables")
        return ()
    options_allowed = driver.model_options if driver else {}
    models: list[DeviceModel] = []
    claimed: dict[str, str] = {}
    for number, entry in enumerate(raw, start=1):
        path = f"models[{number}]"
        if not isinstance(entry, dict):
            read.add(path, "must be a table")
            continue
        read.unknown(entry, _MODEL_KEYS | frozenset(options_allowed), path)
        name = read.text_value(entry, "name", path)
        kind_raw = entry.get("kind")
        kind: DeviceKindName | None = None
        if kind_raw not in tuple(kinds):
            declared = ", ".join(kinds) or "none"
            read.add(f"{path}.kind", f"{show(kind_raw)} is not a kind of [kinds] ({declared})")
        else:
            kind = DeviceKindName(kind_raw)
        names = read.strings(entry, "names", path)
        patterns = read.strings(entry, "name_patterns", path)
        if not names and not patterns:
            read.add(f"{path}.names", "a model needs names or name_patterns to be recognised")
        for advertised in names:
            if advertised in claimed:
                read.add(f"{path}.names", f"{show(advertised)} is already {claimed[advertised]}'s")
            claimed[advertised] = name
        options: dict[str, int] = {}
        for key, (low, high) in options_allowed.items():
            value = read.whole(entry.get(key), f"{path}.{key}", low, high)
            if value is not None:
                options[key] = value
        if kind is not None and name:
            models.append(DeviceModel(name, kind, names, patterns, options))
    return tuple(models)


def build_catalogue(files: Sequence[tuple[str, str]]) -> DeviceCatalogue:
    """The catalogue of ``(label, text)`` family files; every problem of every file at once.

    Across files: a family id is declared once, and an advertised name belongs to one
    family (two families claiming it could not both be right).
    """
    problems: list[tuple[str, Problem]] = []
    families: list[DeviceFamily] = []
    for label, text in files:
        family, found = _parse_family(text, label)
        problems += [(label, p) for p in found]
        if family is not None:
            families.append(family)
    by_id: dict[str, DeviceFamily] = {}
    owner: dict[str, DeviceFamily] = {}
    for family in families:
        other = by_id.get(family.id)
        if other is not None:
            problems.append(
                (family.label, Problem("family.id", f"{family.id!r} is declared by {other.label}"))
            )
            continue
        by_id[family.id] = family
        for number, model in enumerate(family.models, start=1):
            for advertised in model.names:
                first = owner.setdefault(advertised, family)
                if first is not family:
                    path = f"models[{number}].names"
                    problems.append(
                        (
                            family.label,
                            Problem(
                                path,
                                f"{advertised!r} is already a name of the {first.id} family "
                                f"({first.label})",
                            ),
                        )
                    )
    if not families and not problems:
        problems.append(("(catalogue)", Problem("(files)", "no family files")))
    if problems:
        raise CatalogueError(problems)
    return DeviceCatalogue(tuple(families))


def shipped_family_files() -> list[tuple[str, str]]:
    """The family files shipped as package data, OFCP first (``(label, text)``)."""
    folder = resources.files("devicebridge") / "data" / "devices"
    entries = sorted(
        (e for e in folder.iterdir() if e.name.endswith(".toml")),
        key=lambda e: (e.name != "ofcp.toml", e.name),
    )
    return [(f"devices/{e.name}", e.read_text("utf-8")) for e in entries]


_DEFAULT: list[DeviceCatalogue] = []


def default_catalogue() -> DeviceCatalogue:
    """The shipped catalogue (read once; package data never changes while running)."""
    if not _DEFAULT:
        _DEFAULT.append(build_catalogue(shipped_family_files()))
    return _DEFAULT[0]


def load_catalogue(extra_dir: Path | None) -> DeviceCatalogue:
    """The shipped family files, and every ``*.toml`` of ``extra_dir`` (the
    ``device_catalogue_dir`` setting): validated together, every problem of every file
    named at once (:class:`CatalogueError`)."""
    files = shipped_family_files()
    if extra_dir is not None:
        try:
            paths = sorted(p for p in extra_dir.iterdir() if p.suffix == ".toml")
        except OSError as exc:
            where = Problem("(directory)", f"cannot list the directory: {exc.strerror}")
            raise CatalogueError([(str(extra_dir), where)]) from exc
        for path in paths:
            try:
                files.append((str(path), path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                problem = Problem("(file)", f"unreadable: {why}")
                raise CatalogueError([(str(path), problem)]) from exc
    return build_catalogue(files)
