"""``routine validate|list``, ``run``, ``history``, ``report`` and ``treatment`` via CliRunner."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from devicebridge.cli import main
from simulators import SimulatedDevice

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 10_000

UNSAFE = """[routine]
name = "unsafe"
author = "tests"
version = "1"
device_kind = "massager"

[[steps]]
zone = "eye_area_left"
contact_time_s = 90
mode = "vibration"
intensity = 4
pressure_kpa = { min = 1.0, max = 6.0 }
guidence = "typo"
"""


def flat(text: str) -> str:
    """Error output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("DEVICEBRIDGE_CONFIG", raising=False)
    monkeypatch.delenv("DEVICEBRIDGE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    runner = CliRunner()
    data_dir = tmp_path / "data"

    def run(*args: str) -> Result:
        return runner.invoke(
            main,
            ["--simulate", "--sim-fast", "--sim-seed", "42", "--data-dir", str(data_dir), *args],
            catch_exceptions=False,
        )

    return run


@pytest.fixture
def device_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write any simulated device receives from the host."""
    seen: list[bytes] = []
    original = SimulatedDevice.receive

    def receive(self: SimulatedDevice, channel: object, data: bytes) -> None:
        seen.append(bytes(data))
        original(self, channel, data)  # type: ignore[arg-type]

    monkeypatch.setattr(SimulatedDevice, "receive", receive)
    return seen


def test_validate_prints_every_problem_with_line_key_and_rule(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "unsafe.toml"
    path.write_text(UNSAFE)
    result = invoke("routine", "validate", str(path))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert f"{path}:13: steps[1].guidence: unknown key" in lines[0]
    assert any(
        line.startswith(f"{path}:9: steps[1].contact_time_s: 90 s on eye_area_left")
        and "(policy: zones.eye_area.pass_cap_s = 45, source: [E]" in line
        for line in lines
    )
    assert any(
        line.startswith(f"{path}:12: steps[1].pressure_kpa: band goes up to 6 kPa")
        and "zones.eye_area.cap_kpa = 4" in line
        for line in lines
    )
    assert any(
        line.startswith(f"{path}:11: steps[1].intensity: intensity 4 on eye_area_left is above")
        and "zones.eye_area.intensity_cap = 3" in line
        for line in lines
    )
    assert "4 problems" in result.stderr

    good = invoke("routine", "validate", "devicebridge/data/routines/firming.toml")
    assert good.exit_code == 0, good.output
    assert "ok" in good.output
    assert ": note:" not in good.output


def test_validate_notes_a_category_the_policy_does_not_know(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "misspelt.toml"
    firming = Path("devicebridge/data/routines/firming.toml").read_text()
    firming = firming.replace("[schedule]\nmax_sessions = 2\nper_days = 7\n", "")
    path.write_text(firming.replace('category = "firming"', 'category = "Fiming"'))
    result = invoke("routine", "validate", str(path))
    assert result.exit_code == 0, result.output
    assert "category 'fiming' is not one the policy knows" in result.stdout
    assert "every frequency rule of the policy applies to it" in result.stdout
    spelt = tmp_path / "spelt.toml"
    spelt.write_text(firming.replace('category = "firming"', 'category = "FIRMING"'))
    assert ": note:" not in invoke("routine", "validate", str(spelt)).stdout


def test_validate_reports_bad_toml_and_a_missing_file(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "broken.toml"
    path.write_text("[routine\nname = 1\n")
    result = invoke("routine", "validate", str(path))
    assert result.exit_code == 1
    assert "not valid TOML" in result.output
    missing = invoke("routine", "validate", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 1
    assert "nope.toml: cannot read" in flat(missing.output)


def test_routine_list_shows_the_starter_library(invoke) -> None:  # type: ignore[no-untyped-def]
    rows = json.loads(invoke("routine", "list", "--json").output)
    by_id = {row["id"]: row for row in rows}
    assert by_id["firming"]["device_kind"] == "massager"
    assert by_id["firming"]["total_s"] == 285
    assert by_id["led_red_near_infrared"]["category"] == "led_red_near_infrared"


def test_run_refuses_an_unsafe_file_before_any_command(  # type: ignore[no-untyped-def]
    invoke, tmp_path: Path, device_writes: list[bytes]
) -> None:
    path = tmp_path / "unsafe.toml"
    path.write_text(UNSAFE)
    result = invoke("run", str(path), "--device", "FaceMassager")
    assert result.exit_code == 1
    assert f"{path}:12: steps[1].pressure_kpa" in flat(result.output)
    assert "nothing was sent to a device" in flat(result.output)
    assert device_writes == []
    unknown = invoke("run", "no_such_routine", "--device", "FaceMassager")
    assert unknown.exit_code == 1
    assert "no_such_routine: no such routine file" in flat(unknown.output)


def test_run_history_report_and_exports(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scanned = json.loads(invoke("scan", "--json", "--timeout-s", "1").output)
    massager = next(d for d in scanned if d["kind"] == "massager")
    mask = next(d for d in scanned if d["kind"] == "led_mask")
    # Host mode: the host engine drives the device command by command.
    ran = invoke(
        "run", "firming", "--device", massager["name"], "--duration-s", "400", "--mode", "host"
    )
    assert ran.exit_code == 0, ran.output
    assert "NEXT_STEP: Step 2/5: cheek_right" in ran.output
    assert "completed" in ran.output
    lit = invoke("run", "led_red_near_infrared", "--device", mask["name"], "--duration-s", "700")
    assert lit.exit_code == 0, lit.output

    history = json.loads(invoke("history", "--json").output)
    assert [h["status"] for h in history] == ["completed", "completed"]
    massage_id = next(h["id"] for h in history if h["device_kind"] == "massager")
    mask_id = next(h["id"] for h in history if h["device_kind"] == "led_mask")
    assert "Firming" in invoke("history").output

    png, csv_path, json_path = tmp_path / "m.png", tmp_path / "m.csv", tmp_path / "m.json"
    report = invoke(
        "report",
        str(massage_id),
        "--png",
        str(png),
        "--csv",
        str(csv_path),
        "--json",
        str(json_path),
    )
    assert report.exit_code == 0, report.output
    assert "completion: 100 % (5/5 steps)" in report.output
    assert "cheek_left: 60.0 s" in report.output
    assert "time in band: 285.0 s" in report.output
    stored = int(
        next(x for x in report.output.splitlines() if x.startswith("samples stored")).split()[-1]
    )
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > MIN_PNG_BYTES
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == stored
    assert {"pressure_kpa", "zone", "motor_on"} <= set(rows[0])
    # Typed columns: flags as 0/1, the mode and the zone by name.
    assert {row["contact"] for row in rows} <= {"0", "1"}
    assert {row["motor_on"] for row in rows} == {"0", "1"}
    assert {row["mode"] for row in rows} <= {"off", "vibration", "percussion", "pulse"}
    assert "cheek_left" in {row["zone"] for row in rows}
    exported = json.loads(json_path.read_text())
    assert len(exported["telemetry"]) == stored
    assert exported["summary"]["completed"] is True

    mask_png = tmp_path / "mask.png"
    mask_report = invoke("report", str(mask_id), "--png", str(mask_png))
    assert mask_report.exit_code == 0, mask_report.output
    assert "red: 9.00 J/cm²" in mask_report.output
    assert mask_png.read_bytes().startswith(PNG_SIGNATURE)

    missing = invoke("report", "999")
    assert missing.exit_code == 1
    assert "no session 999" in flat(missing.output)


def test_treatment_blocks_a_massage_of_the_zone(  # type: ignore[no-untyped-def]
    invoke, device_writes: list[bytes]
) -> None:
    three_days_ago = (datetime.now() - timedelta(days=3)).strftime("%Y-%m-%d")
    added = invoke("treatment", "add", "filler", "--date", three_days_ago, "--zones", "cheek,chin")
    assert added.exit_code == 0, added.output
    listed = json.loads(invoke("treatment", "list", "--json").output)
    assert listed[0]["kind"] == "filler"
    assert listed[0]["zones"] == ["cheek", "chin"]
    bad = invoke("treatment", "add", "laser", "--date", "2025-01-01", "--zones", "cheek")
    assert bad.exit_code == 1
    assert "unknown treatment 'laser'" in flat(bad.output)
    bad_zone = invoke("treatment", "add", "filler", "--date", "2025-01-01", "--zones", "ear")
    assert bad_zone.exit_code == 1
    assert "--zones: unknown zone ear" in flat(bad_zone.output)
    bad_date = invoke("treatment", "add", "filler", "--date", "01/02/2025", "--zones", "chin")
    assert bad_date.exit_code == 1
    assert "--date" in bad_date.output

    # The filler blocks massage of its zones for 14 days: the run is refused.
    name = next(d["name"] for d in json.loads(invoke("scan", "--json").output))
    before = len(device_writes)
    refused = invoke("run", "firming", "--device", name)
    assert refused.exit_code == 1
    assert "filler on cheek, chin" in flat(refused.output)
    assert len(device_writes) == before
    assert json.loads(invoke("history", "--json").output)[0]["status"] == "refused"
