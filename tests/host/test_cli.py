"""The command line through click's CliRunner, on the in-process simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from devicebridge.cli import main


@pytest.fixture
def invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    # Keep the developer's real config and data out of the tests.
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


def test_scan_pair_devices_watch_forget(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scanned = invoke("scan", "--json", "--timeout-s", "1")
    assert scanned.exit_code == 0, scanned.output
    devices = json.loads(scanned.output)
    assert [d["kind"] for d in devices].count("massager") == 2
    assert [d["kind"] for d in devices].count("led_mask") == 1
    assert not any(d["paired"] for d in devices)
    massager = next(d for d in devices if d["kind"] == "massager")

    # Pair by serial number (a new process in real life: the same seed gives the same devices).
    paired = invoke("pair", massager["serial_number"], "--name", "left")
    assert paired.exit_code == 0, paired.output
    assert "Paired 'left'" in paired.output
    by_name = invoke("pair", next(d for d in devices if d["kind"] == "led_mask")["name"])
    assert by_name.exit_code == 0, by_name.output

    listed = json.loads(invoke("devices", "--json").output)
    assert {d["name"] for d in listed} >= {"left"}
    left = next(d for d in listed if d["name"] == "left")
    assert left["serial_number"] == massager["serial_number"]
    assert left["firmware"] == "1.0.0-sim"
    assert [h["version"] for h in left["firmware_history"]] == ["1.0.0-sim"]
    table = invoke("devices")
    assert "left" in table.output

    rescanned = json.loads(invoke("scan", "--json", "--timeout-s", "1").output)
    assert next(d for d in rescanned if d["serial_number"] == massager["serial_number"])["paired"]
    assert "left" in invoke("scan", "--timeout-s", "1").output

    watched = invoke("watch", "left", "--duration-s", "2")
    assert watched.exit_code == 0, watched.output
    assert "samples=" in watched.output  # plain output: not a terminal
    assert "Summary" in watched.output

    again = invoke("pair", massager["serial_number"], "--name", "other")
    assert again.exit_code == 1
    assert "already paired as 'left'" in again.output
    assert "Traceback" not in again.output

    assert invoke("forget", "left").exit_code == 0
    missing = invoke("forget", "left")
    assert missing.exit_code == 1
    assert "no paired device named 'left'" in missing.output
    assert invoke("watch", "left", "--duration-s", "1").exit_code == 1


def test_pair_unknown_device_is_a_one_line_error(invoke) -> None:  # type: ignore[no-untyped-def]
    result = invoke("pair", "NO-SUCH-DEVICE", "--timeout-s", "1")
    assert result.exit_code == 1
    assert "NO-SUCH-DEVICE" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_config_names_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("sim_seed = 'abc'\n")
    result = CliRunner().invoke(main, ["--config", str(config), "devices"])
    assert result.exit_code == 1
    assert "sim_seed" in result.output
    assert str(config) in result.output


def test_demo_fast(invoke) -> None:  # type: ignore[no-untyped-def]
    result = invoke("demo", "--fast", "--duration-s", "3")
    assert result.exit_code == 0, result.output
    assert "Summary" in result.output
    assert "FaceMassager" in result.output
    assert "LedMask" in result.output
    assert "led=" in result.output  # the mask's irradiance shows in the live lines


@pytest.fixture
def sim_server():  # type: ignore[no-untyped-def]
    """``devicebridge-sim serve --serial`` in its own process, as a user would run it."""
    process = subprocess.Popen(
        [sys.executable, "-c", "from simulators.cli import main; main()", "serve", "--serial"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    kind, serial_number, path = process.stdout.readline().split()
    yield kind, serial_number, path
    process.terminate()
    process.wait(timeout=10)
    process.stdout.close()


def test_pair_and_watch_over_serial_port_of_a_separate_simulator(  # type: ignore[no-untyped-def]
    sim_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind, serial_number, path = sim_server
    monkeypatch.delenv("DEVICEBRIDGE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    base = ["--no-simulate", "--data-dir", str(tmp_path / "data")]
    runner = CliRunner()
    paired = runner.invoke(main, [*base, "pair", "--serial-port", path, "--name", "wired"])
    assert paired.exit_code == 0, paired.output
    assert serial_number in paired.output
    listed = json.loads(runner.invoke(main, [*base, "devices", "--json"]).output)
    assert listed[0]["transport"] == "serial"
    assert listed[0]["serial_port"] == path
    assert listed[0]["kind"] == kind
    # The other process runs in real time: this only checks the path end to end.
    watched = runner.invoke(main, [*base, "watch", "wired", "--duration-s", "0.6"])
    assert watched.exit_code == 0, watched.output
    assert "Summary" in watched.output
