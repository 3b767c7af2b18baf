"""The device catalogue: the shipped families, matching advertisements, and every problem of a
malformed family file named with its file, key and line."""

from __future__ import annotations

import pytest

from devicebridge.core.catalogue import (
    BATTERY,
    CONTACT,
    PRESSURE,
    DeviceCatalogue,
    IdentityRule,
    KindSupport,
    build_catalogue,
    capabilities_of,
    default_catalogue,
    device_identity,
    device_intensity,
    shipped_family_files,
    support_from_capabilities,
)
from devicebridge.core.device_fit import NOT_MEASURED, checks_applied, device_problems
from devicebridge.core.policy import default_policy
from devicebridge.core.routine import DeviceKindName, parse_routine
from devicebridge.errors import CatalogueError, RoutineError
from protocols import FACIAL_CARE_SERVICE_UUID, MANUFACTURER_ID, Capability, DeviceKind

FOREO_TEXT = dict(shipped_family_files())["devices/foreo.toml"]
OFCP_TEXT = dict(shipped_family_files())["devices/ofcp.toml"]


def test_the_shipped_catalogue_has_ofcp_then_foreo() -> None:
    catalogue = default_catalogue()
    assert [f.id for f in catalogue.families] == ["ofcp", "foreo"]
    ofcp, foreo = catalogue.families
    assert ofcp.identity is IdentityRule.SERIAL
    assert ofcp.verified
    assert foreo.identity is IdentityRule.ADDRESS
    assert not foreo.verified
    assert "buttplug" in foreo.source.casefold()
    massager = foreo.kinds[DeviceKindName.MASSAGER]
    assert (massager.intensity_min, massager.intensity_max) == (0, 10)
    assert massager.measures == frozenset({BATTERY})
    assert not massager.senses_skin
    assert ofcp.kinds[DeviceKindName.MASSAGER].senses_skin


def test_advertisements_are_matched_by_protocol_evidence_then_by_name() -> None:
    catalogue = default_catalogue()
    luna = catalogue.match("LUNA 3")
    assert luna is not None
    assert luna.family.id == "foreo"
    assert luna.model is not None
    assert luna.model.name == "LUNA 3"
    assert luna.kind is DeviceKindName.MASSAGER
    by_service = catalogue.match("FM-1234", [FACIAL_CARE_SERVICE_UUID.upper()])
    assert by_service is not None
    assert by_service.family.id == "ofcp"
    assert by_service.model is None
    assert by_service.kind is None  # OFCP has two kinds: the advertisement says which
    by_company = catalogue.match(None, [], [MANUFACTURER_ID])
    assert by_company is not None
    assert by_company.family.id == "ofcp"
    # An OFCP device that happens to be called "LUNA 3" is an OFCP device.
    clash = catalogue.match("LUNA 3", [FACIAL_CARE_SERVICE_UUID])
    assert clash is not None
    assert clash.family.id == "ofcp"
    assert catalogue.match("luna 3") is None  # names are exact, as Buttplug's
    assert catalogue.match("Pixel Buds") is None
    assert catalogue.match(None) is None


def test_identity_is_the_serial_or_the_familys_address_rule() -> None:
    ofcp, foreo = default_catalogue().families
    assert device_identity(ofcp, "FM00ABCD", "AA:BB") == "FM00ABCD"
    assert device_identity(foreo, None, "C4:7F:51:0A:12:34") == "foreo@C4:7F:51:0A:12:34"
    # A macOS address: the UUID CoreBluetooth gives the device (stable on that Mac).
    uuid = "6C2A9E3E-1F2B-4C55-9C0D-2F7D1B3E8A90"
    assert device_identity(foreo, None, uuid) == f"foreo@{uuid}"


def test_routine_levels_map_onto_the_devices_own_steps() -> None:
    zero_to_ten = KindSupport(DeviceKindName.MASSAGER, 0, 10, ("vibration",))
    assert [device_intensity(zero_to_ten, n) for n in range(11)] == list(range(11))
    zero_to_three = KindSupport(DeviceKindName.MASSAGER, 0, 3, ("vibration",))
    assert [device_intensity(zero_to_three, n) for n in range(11)] == [
        0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3,
    ]  # fmt: skip


def test_capabilities_round_trip_through_a_device_profile() -> None:
    foreo = default_catalogue().families[1].kinds[DeviceKindName.MASSAGER]
    flags = capabilities_of(foreo)
    assert flags == Capability.VIBRATION
    back = support_from_capabilities(DeviceKind.MASSAGER, flags)
    assert back is not None
    assert back.measures == frozenset({BATTERY})
    assert "vibration" in back.modes
    assert not back.programs
    full = Capability.PRESSURE_SENSOR | Capability.CONTACT_SENSOR | Capability.VIBRATION
    massager = support_from_capabilities(DeviceKind.MASSAGER, full)
    assert massager is not None
    assert {PRESSURE, CONTACT} <= massager.measures
    assert support_from_capabilities(99, 0) is None


def test_scan_shows_what_each_family_supports() -> None:
    ofcp, foreo = default_catalogue().families
    assert foreo.kinds[DeviceKindName.MASSAGER].describe() == (
        "vibration 0-10; measures battery; no pressure, contact, skin temperature; "
        "no device programs"
    )
    assert (
        ofcp.kinds[DeviceKindName.MASSAGER]
        .describe()
        .startswith("vibration/percussion/pulse 0-10; measures pressure, contact, skin temperature")
    )


# --------------------------------------------------------------------------- malformed files


def problems_of(*files: tuple[str, str]) -> list[str]:
    with pytest.raises(CatalogueError) as refused:
        build_catalogue([("devices/ofcp.toml", OFCP_TEXT), *files])
    text = str(refused.value)
    assert text.startswith("device catalogue: ")
    return text.splitlines()[1:]


def test_a_malformed_family_file_names_its_file_key_and_line() -> None:
    text = FOREO_TEXT.replace('driver = "foreo"', 'driver = "lovense"').replace(
        "mode = 3", "mode = 300"
    )
    lines = problems_of(("extra/foreo.toml", text))
    driver = next(line for line in lines if "family.driver" in line)
    assert driver.startswith("extra/foreo.toml:")
    assert "unknown driver 'lovense'; known: foreo, ofcp" in driver
    line_no = int(driver.split(":")[1])
    assert text.splitlines()[line_no - 1].startswith("driver =")


def test_every_problem_of_every_file_at_once() -> None:
    broken = (
        FOREO_TEXT.replace('identity = "address"', 'identity = "mac"')
        .replace("mode = 3", "mode = 300")
        .replace('measures = ["battery"]', 'measures = ["battery", "pressure"]')
        .replace("[gatt]", '[gatt]\nnotify = "0000fff2-0000-1000-8000-00805f9b34fb"')
        .replace('control = "0000fff1-0000-1000-8000-00805f9b34fb"', 'control = "fff1"')
    )
    lines = problems_of(("more/foreo.toml", broken), ("more/notes.toml", "[family\n"))
    text = "\n".join(lines)
    assert "more/foreo.toml" in text
    for expected in (
        'family.identity: must be "serial" or "address", got \'mac\'',
        "models[3].mode: must be from 0 to 255, got 300",
        "kinds.massager.measures: the driver cannot report pressure",
        "gatt.notify: unknown key (allowed: battery_level, battery_service, control, service)",
        "gatt.control: 'fff1' is not a 128-bit UUID",
    ):
        assert expected in text, expected
    assert any(line.startswith("more/notes.toml: (file): not valid TOML") for line in lines)
    assert all(":" in line.split(" ", 1)[0] for line in lines)  # every line names its file


def test_ofcp_entries_must_state_the_protocols_own_attributes() -> None:
    text = OFCP_TEXT.replace(
        'control = "f4ce0003-8d1a-4b6e-9c2f-5a7e3b9d0c11"',
        'control = "f4ce0009-8d1a-4b6e-9c2f-5a7e3b9d0c11"',
    )
    with pytest.raises(CatalogueError) as refused:
        build_catalogue([("devices/ofcp.toml", text)])
    assert (
        "gatt.control: f4ce0009-8d1a-4b6e-9c2f-5a7e3b9d0c11 is not what the driver's protocol "
        "defines (f4ce0003-8d1a-4b6e-9c2f-5a7e3b9d0c11)"
    ) in str(refused.value)


def test_a_name_belongs_to_one_family_and_a_family_to_one_file() -> None:
    copy = FOREO_TEXT.replace('id = "foreo"', 'id = "foreo_copy"')
    lines = problems_of(("devices/foreo.toml", FOREO_TEXT), ("mine/foreo_copy.toml", copy))
    assert any(
        line.startswith("mine/foreo_copy.toml")
        and "models[1].names: 'FOFO' is already a name of the foreo family (devices/foreo.toml)"
        in line
        for line in lines
    )
    renamed = problems_of(("mine/luna.toml", FOREO_TEXT))
    assert any("family.id: 'foreo' must be the file's name (luna.toml)" in line for line in renamed)


def test_a_family_that_nothing_recognises_is_refused() -> None:
    text = FOREO_TEXT.split("[[models]]")[0]
    lines = problems_of(("devices/foreo.toml", text))
    assert any("match: nothing recognises the family's devices" in line for line in lines)


def test_a_user_family_for_a_known_driver_is_accepted() -> None:
    """A rebadged device of a known protocol is a family file, no code."""
    text = (
        FOREO_TEXT.split("[[models]]")[0].replace('id = "foreo"', 'id = "acme"')
        + '[[models]]\nname = "Acme Glow"\nkind = "massager"\nname_patterns = ["ACME-GLOW-*"]\n'
        "mode = 2\n"
    )
    catalogue: DeviceCatalogue = build_catalogue(
        [*shipped_family_files(), ("mine/acme.toml", text)]
    )
    match = catalogue.match("ACME-GLOW-0042")
    assert match is not None
    assert match.family.id == "acme"
    assert match.model is not None
    assert match.model.options == {"mode": 2}


# --------------------------------------------------------------------------- routines


ROUTINE = """[routine]
name = "mixed"
author = "tests"
version = "1"
device_kind = "massager"

[[steps]]
zone = "cheek_left"
contact_time_s = 30
mode = "percussion"
intensity = 4
pressure_kpa = { min = 4.0, max = 12.0 }

[[steps]]
zone = "chin"
timing = "time"
duration_s = 20
intensity = 4
pressure_kpa = { min = 5.0, max = 20.0 }
"""


def test_a_step_that_needs_what_the_device_cannot_measure_is_refused_unless_by_time() -> None:
    routine = parse_routine(ROUTINE, default_policy(), label="mixed.toml")
    foreo = default_catalogue().families[1].kinds[DeviceKindName.MASSAGER]
    problems = device_problems(routine, foreo, "LUNA 3")
    assert [(p.path, p.line) for p in problems] == [
        ("steps[1].mode", 10),
        ("steps[1].pressure_kpa", 12),
    ]
    assert "LUNA 3 has no percussion mode (it has vibration)" in problems[0].message
    assert "LUNA 3 does not measure pressure or contact" in problems[1].message
    ofcp = default_catalogue().families[0].kinds[DeviceKindName.MASSAGER]
    assert device_problems(routine, ofcp, "FM-1") == []


def test_the_record_says_which_checks_applied() -> None:
    routine = parse_routine(ROUTINE, default_policy(), label="mixed.toml")
    ofcp, foreo = (f.kinds[DeviceKindName.MASSAGER] for f in default_catalogue().families)
    by_time = checks_applied(routine, foreo, by_time=True)
    assert by_time["pressure"] == NOT_MEASURED == "not measured by this device"
    assert by_time["contact"] == NOT_MEASURED
    assert by_time["time"].startswith("by the host clock")
    measured = checks_applied(routine, ofcp, by_time=False)
    assert measured["pressure"] == "band and per-zone cap"
    assert measured["time"].startswith("by the device's sample clock")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("contact_time_s = 30", "duration_s = 30"),
            'steps[1].duration_s: duration_s is for a step with timing = "time"',
        ),
        (
            ("duration_s = 20", "contact_time_s = 20"),
            'steps[2].contact_time_s: a step with timing = "time" lasts duration_s',
        ),
        (('timing = "time"', 'timing = "clock"'), 'steps[2].timing: must be "contact"'),
        (
            (
                "intensity = 4\npressure_kpa = { min = 5.0",
                "intensity = 9\npressure_kpa = { min = 5.0",
            ),
            "steps[2].intensity: intensity 9 on chin is above the zone's cap of 8",
        ),
    ],
)
def test_timing_mistakes_are_named(change: tuple[str, str], expected: str) -> None:
    with pytest.raises(RoutineError) as refused:
        parse_routine(ROUTINE.replace(*change), default_policy(), label="mixed.toml")
    assert expected in str(refused.value)
