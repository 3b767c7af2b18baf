"""The commands a FOREO owner runs, against simulated devices: scan shows every catalogued
device with its family and what it supports, pair remembers a device without a serial
number by its identity, a routine by time runs and is stored and reported, a routine with a
pressure band is refused, and a malformed catalogue file stops every command at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from devicebridge.cli import main
from devicebridge.core.catalogue import shipped_family_files

TIMED = """[routine]
name = "luna evening"
author = "tests"
version = "1"
device_kind = "massager"
category = "general"

[[steps]]
zone = "forehead"
timing = "time"
duration_s = 20
intensity = 6
guidance = "Small circles from the brow up."

[[steps]]
zone = "cheek_right"
timing = "time"
duration_s = 20
intensity = 5
"""


@pytest.fixture
def invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The CLI with one simulated OFCP massager and one simulated FOREO LUNA 3."""
    monkeypatch.delenv("DEVICEBRIDGE_CONFIG", raising=False)
    monkeypatch.delenv("DEVICEBRIDGE_DATA_DIR", raising=False)
    config = tmp_path / "config.toml"
    config.write_text("sim_massagers = 1\nsim_masks = 0\nsim_foreo = 1\nscan_timeout_s = 1.0\n")
    runner = CliRunner()

    def run(*args: str, config_file: Path = config) -> Result:
        return runner.invoke(
            main,
            [
                "--config",
                str(config_file),
                "--simulate",
                "--sim-fast",
                "--sim-seed",
                "7",
                "--data-dir",
                str(tmp_path / "data"),
                *args,
            ],
            catch_exceptions=False,
        )

    return run


def test_scan_shows_every_catalogued_device_with_its_family_and_support(invoke) -> None:  # type: ignore[no-untyped-def]
    result = invoke("scan", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["family"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"ofcp", "foreo"}
    luna = rows["foreo"]
    assert luna["name"] == "LUNA 3"
    assert luna["model"] == "LUNA 3"
    assert luna["kind"] == "massager"
    assert luna["serial_number"] is None
    assert luna["identity"].startswith("foreo@")
    assert luna["supports"] == (
        "vibration 0-10; measures battery; no pressure, contact, skin temperature; "
        "no device programs"
    )
    assert rows["ofcp"]["supports"].startswith("vibration/percussion/pulse 0-10; measures pressure")
    table = invoke("scan").stdout
    assert "foreo" in table
    assert "LUNA 3" in table


def test_pair_run_history_and_report_of_a_foreo(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paired = invoke("pair", "LUNA 3", "--name", "luna")
    assert paired.exit_code == 0, paired.output
    assert "Paired 'luna': massager LUNA 3, foreo device known as foreo@" in paired.stdout
    assert "firmware not reported, over ble" in paired.stdout
    devices = json.loads(invoke("devices", "--json").stdout)
    assert [(d["name"], d["family"], d["kind"]) for d in devices] == [("luna", "foreo", "massager")]
    assert devices[0]["serial_number"].startswith("foreo@")
    assert devices[0]["firmware_history"] == []
    scanned = {r["family"]: r for r in json.loads(invoke("scan", "--json").stdout)}
    assert scanned["foreo"]["paired"] is True
    assert scanned["foreo"]["paired_name"] == "luna"

    routine = tmp_path / "luna.toml"
    routine.write_text(TIMED)
    ran = invoke("run", str(routine), "--device", "luna")
    assert ran.exit_code == 0, ran.output
    assert "by_time" in ran.stdout  # the live lines say the guidance runs by time
    assert "MOVE" not in ran.stdout
    assert "Move to the next spot on forehead (5 s left here)." in ran.stdout
    assert "pressure" in ran.stdout
    assert "not measured by this device" in ran.stdout
    assert "completed" in ran.stdout

    history = json.loads(invoke("history", "--json").stdout)
    assert history[0]["routine"] == "luna evening"
    assert history[0]["status"] == "completed"
    report = invoke("report", str(history[0]["id"]))
    assert report.exit_code == 0, report.output
    assert "pressure: not measured by this device" in report.stdout
    assert "time in each zone (by the clock):" in report.stdout


def test_a_routine_with_a_pressure_band_is_refused_on_a_foreo(invoke) -> None:  # type: ignore[no-untyped-def]
    assert invoke("pair", "LUNA 3", "--name", "luna").exit_code == 0
    refused = invoke("run", "firming", "--device", "luna")
    assert refused.exit_code == 1
    error = " ".join(refused.stderr.split())
    assert "luna cannot run 'Firming: cheeks, jawline, chin':" in error
    assert "routine:25: steps[1].pressure_kpa: luna does not measure pressure or contact" in error
    assert "steps[3].mode: luna has no percussion mode (it has vibration)" in error
    history = json.loads(invoke("history", "--json").stdout)
    assert history[0]["status"] == "refused"


def test_validate_checks_a_routine_against_a_family(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    firming = "devicebridge/data/routines/firming.toml"
    refused = invoke("routine", "validate", firming, "--family", "foreo")
    assert refused.exit_code == 1
    first = refused.stdout.splitlines()[0]
    assert first.startswith(f"{firming}:")
    assert "steps[1].pressure_kpa: a FOREO device does not measure pressure or contact" in first
    assert invoke("routine", "validate", firming, "--family", "ofcp").exit_code == 0
    timed = tmp_path / "luna.toml"
    timed.write_text(TIMED)
    ok = invoke("routine", "validate", str(timed), "--family", "foreo")
    assert ok.exit_code == 0, ok.output
    unknown = invoke("routine", "validate", str(timed), "--family", "lovense")
    assert unknown.exit_code == 1
    assert "--family lovense: not in the device catalogue (ofcp, foreo)" in unknown.stderr


def test_a_malformed_or_unknown_catalogue_file_is_refused_at_start_up(
    invoke,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    families = tmp_path / "families"
    families.mkdir()
    foreo = dict(shipped_family_files())["devices/foreo.toml"]
    acme = (
        foreo.split("[[models]]")[0]
        .replace('id = "foreo"', 'id = "acme"')
        .replace('driver = "foreo"', 'driver = "acme_wire"')
        + '[[models]]\nname = "Glow"\nkind = "massager"\nnames = ["ACME GLOW"]\n'
    )
    (families / "acme.toml").write_text(acme)
    driver_line = acme.splitlines().index('driver = "acme_wire"') + 1
    (families / "notes.toml").write_text('title = "my devices"\n')
    config = tmp_path / "with-families.toml"
    config.write_text(f'sim_foreo = 1\ndevice_catalogue_dir = "{families}"\n')
    for command in (("devices",), ("history",), ("scan",)):
        result = invoke(*command, config_file=config)
        assert result.exit_code == 1, command
        error = " ".join(result.stderr.split())
        assert "device catalogue:" in error
        assert (
            f"{families / 'acme.toml'}:{driver_line}: family.driver: unknown driver 'acme_wire'; "
            "known: foreo, ofcp"
        ) in error
        assert f"{families / 'notes.toml'}: family: missing table: a family file starts" in error
        assert f"{families / 'notes.toml'}:1: title: unknown key" in error


def test_a_foreo_takes_no_firmware_update_through_the_bridge(invoke) -> None:  # type: ignore[no-untyped-def]
    assert invoke("pair", "LUNA 3", "--name", "luna").exit_code == 0
    result = invoke("firmware", "info", "luna")
    assert result.exit_code == 1
    assert "luna: a FOREO device: its firmware is not updated through devicebridge" in (
        " ".join(result.stderr.split())
    )
