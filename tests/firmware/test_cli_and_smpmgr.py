"""The ``firmware`` commands, and the stock ``smpmgr`` client against a simulated device."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from devicebridge.cli import main
from simulators.smp import ImageDefect, build_image

# Real-time safety nets for subprocesses (the simulator runs with --fast).
PROCESS_TIMEOUT_S = 60.0


@pytest.fixture
def invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("DEVICEBRIDGE_CONFIG", raising=False)
    monkeypatch.delenv("DEVICEBRIDGE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    runner = CliRunner()
    data_dir = tmp_path / "data"

    def run(*args: str, simulate: bool = True) -> Result:
        prefix = ["--simulate", "--sim-fast", "--sim-seed", "42"] if simulate else []
        return runner.invoke(
            main, [*prefix, "--data-dir", str(data_dir), *args], catch_exceptions=False
        )

    run.data_dir = data_dir  # type: ignore[attr-defined]

    return run


def _pair_massager(invoke) -> str:  # type: ignore[no-untyped-def]
    scanned = json.loads(invoke("scan", "--json", "--timeout-s", "1").output)
    massager = next(d for d in scanned if d["kind"] == "massager")
    assert invoke("pair", massager["serial_number"], "--name", "left").exit_code == 0
    return "left"


def test_update_and_info_over_simulated_ble(invoke, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name = _pair_massager(invoke)
    before = json.loads(invoke("firmware", "info", name, "--json").output)
    assert [(s["slot"], s["version"], s["active"]) for s in before] == [(0, "1.0.0", True)]

    image = tmp_path / "fw.bin"
    image.write_bytes(build_image("1.1.0", "OFC-FM1", body_bytes=32 * 1024))
    result = invoke("firmware", "update", name, str(image))
    assert result.exit_code == 0, result.output
    assert "uploaded" in result.output  # plain progress lines without a terminal
    assert re.search(r"left now runs 1\.1\.0 \(was 1\.0\.0\), confirmed", result.output)
    listed = json.loads(invoke("devices", "--json").output)
    history = [h["version"] for h in listed[0]["firmware_history"]]
    assert history == ["1.0.0-sim", "1.1.0"]
    # Each --simulate command builds its devices again, with the flash they had: the
    # next command finds the new image running, and the old one in the other slot.
    after = json.loads(invoke("firmware", "info", name, "--json").output)
    assert [(s["slot"], s["version"], s["active"], s["confirmed"]) for s in after] == [
        (0, "1.1.0", True, True),
        (1, "1.0.0", False, False),
    ]
    assert {s["size_bytes"] for s in after} == {512 * 1024}
    again = invoke("firmware", "update", name, str(image))
    assert "already runs 1.1.0" in again.output


def test_an_image_too_large_for_the_slot_is_refused_with_the_slot_size(  # type: ignore[no-untyped-def]
    invoke, tmp_path: Path
) -> None:
    name = _pair_massager(invoke)
    image = tmp_path / "huge.bin"
    image.write_bytes(build_image("1.1.0", "OFC-FM1", body_bytes=600 * 1024))
    result = invoke("firmware", "update", name, str(image))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "update slot holds 524,288 bytes (512 KiB)" in errors[0]
    assert "nothing was uploaded" in errors[0]
    assert "Traceback" not in result.output
    # Nothing reached the device's slots, and the registry's history is unchanged.
    info = json.loads(invoke("firmware", "info", name, "--json").output)
    assert [(s["slot"], s["version"]) for s in info] == [(0, "1.0.0")]
    listed = json.loads(invoke("devices", "--json").output)
    assert [h["version"] for h in listed[0]["firmware_history"]] == ["1.0.0-sim"]


@pytest.mark.parametrize("defect", [*ImageDefect, "wrong-model"])
def test_bad_images_are_refused_before_any_connection(  # type: ignore[no-untyped-def]
    invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defect: ImageDefect | str
) -> None:
    name = _pair_massager(invoke)
    image = tmp_path / "bad.bin"
    if isinstance(defect, ImageDefect):
        image.write_bytes(build_image("1.1.0", "OFC-FM1", defect=defect))
    else:
        image.write_bytes(build_image("1.1.0", "OFC-LM1"))

    def no_link(*args: object, **kwargs: object) -> None:
        raise AssertionError("a link was opened for a bad image")

    monkeypatch.setattr("devicebridge.firmware.connect.updater_for", no_link)
    result = invoke("firmware", "update", name, str(image))
    assert result.exit_code == 1
    expected = {
        ImageDefect.TRUNCATED: "truncated",
        ImageDefect.WRONG_MAGIC: "header magic",
        ImageDefect.WRONG_HASH: "hash mismatch",
        "wrong-model": "built for model 'OFC-LM1'",
    }[defect]
    said = " ".join(result.output.split())  # rich wraps stderr at 80 columns
    assert expected in said
    assert "bad.bin" in said


@pytest.fixture
def smp_sim_server(tmp_path: Path) -> Iterator[tuple[str, str, str, str]]:
    """``devicebridge-sim serve --serial --smp-serial --smp-udp-port 0`` in its own process:
    serial number, OFCP pty, SMP console pty, SMP UDP ``host:port``."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from simulators.cli import main; main()",
            "serve",
            "--serial",
            "--smp-serial",
            "--smp-udp-port",
            "0",
            "--fast",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    _kind, serial_number, ofcp_path, smp_field, udp_field = process.stdout.readline().split()
    yield (
        serial_number,
        ofcp_path,
        smp_field.removeprefix("smp-serial="),
        udp_field.removeprefix("smp-udp="),
    )
    process.terminate()
    process.wait(timeout=PROCESS_TIMEOUT_S)
    process.stdout.close()


def _smpmgr(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("smpmgr", path=str(Path(sys.executable).parent)) or shutil.which(
        "smpmgr"
    )
    assert executable, "smpmgr is not installed: pipx install smpmgr (see pyproject's extras)"
    return subprocess.run(
        [executable, *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
        check=False,
        env={**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"},
    )


def test_stock_smpmgr_reads_states_and_uploads_to_a_simulated_device(  # type: ignore[no-untyped-def]
    smp_sim_server, tmp_path: Path, invoke
) -> None:
    serial_number, ofcp_path, smp_path, _udp = smp_sim_server
    states = _smpmgr("--port", smp_path, "image", "state-read")
    assert states.returncode == 0, states.stdout + states.stderr
    assert "version='1.0.0'" in states.stdout
    assert "active=True" in states.stdout

    data = build_image("1.8.0", "OFC-FM1", body_bytes=24 * 1024)
    image = tmp_path / "fw.bin"
    image.write_bytes(data)
    uploaded = _smpmgr("--port", smp_path, "image", "upload", str(image))
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    after = _smpmgr("--port", smp_path, "image", "state-read")
    assert "version='1.8.0'" in after.stdout
    from devicebridge.firmware import parse_image

    assert parse_image(data).hash.hex().upper() in after.stdout.replace("\n", "").replace(" ", "")

    # The bridge over the same serial console: pair on the OFCP port, update over SMP.
    paired = invoke("pair", "--serial-port", ofcp_path, "--name", "wired", simulate=False)
    assert paired.exit_code == 0, paired.output
    result = invoke(
        "firmware", "update", "wired", str(image), "--smp-port", smp_path, simulate=False
    )
    assert result.exit_code == 0, result.output
    assert "wired now runs 1.8.0" in result.output
    info = json.loads(
        invoke("firmware", "info", "wired", "--smp-port", smp_path, "--json", simulate=False).output
    )
    assert next(s for s in info if s["active"])["version"] == "1.8.0"
    assert serial_number


def test_ctrl_c_during_an_update_says_how_to_resume_and_the_resume_works(  # type: ignore[no-untyped-def]
    invoke, tmp_path: Path
) -> None:
    name = _pair_massager(invoke)
    image = tmp_path / "fw.bin"
    image.write_bytes(build_image("1.2.0", "OFC-FM1", body_bytes=256 * 1024))
    executable = shutil.which("devicebridge", path=str(Path(sys.executable).parent))
    assert executable, "the devicebridge script is installed next to this Python"
    # In real time (no --sim-fast): the upload takes seconds, so there is a middle to stop in.
    command = [
        executable,
        "--simulate",
        "--sim-seed",
        "42",
        "--data-dir",
        str(invoke.data_dir),
        "firmware",
        "update",
        name,
        str(image),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    assert process.stderr is not None
    seen: list[str] = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("uploaded") and "(30%)" in line:
            process.send_signal(signal.SIGINT)
            break
    seen.extend(process.stdout)
    errors = process.stderr.read()
    assert process.wait(timeout=PROCESS_TIMEOUT_S) == 130, "".join(seen) + errors
    process.stdout.close()
    process.stderr.close()

    lines = errors.splitlines()
    assert len(lines) == 1, errors  # one line, no traceback
    kept = int(re.search(r"keeps the ([\d,]+) of", lines[0]).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert image.stat().st_size * 0.3 <= kept < image.stat().st_size
    prefix = "to resume from there, run the same command again: "
    assert prefix in lines[0]
    printed = shlex.split(lines[0].split(prefix, 1)[1])
    assert printed[1:] == command[1:]

    resumed = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=PROCESS_TIMEOUT_S, check=False
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming at {kept} of {image.stat().st_size} bytes" in resumed.stdout
    assert f"{name} now runs 1.2.0 (was 1.0.0), confirmed" in resumed.stdout
    sent = int(re.search(r"; (\d+) bytes sent", resumed.stdout).group(1))  # type: ignore[union-attr]
    assert sent < image.stat().st_size - kept + 8 * 1024


def test_a_pipelined_update_over_udp_refereed_by_smpmgr(  # type: ignore[no-untyped-def]
    smp_sim_server, tmp_path: Path, invoke
) -> None:
    _serial_number, ofcp_path, smp_path, udp_endpoint = smp_sim_server
    data = build_image("2.3.0", "OFC-FM1", body_bytes=96 * 1024)
    image = tmp_path / "fw.bin"
    image.write_bytes(data)
    paired = invoke("pair", "--serial-port", ofcp_path, "--name", "lab", simulate=False)
    assert paired.exit_code == 0, paired.output
    result = invoke(
        "firmware", "update", "lab", str(image), "--smp-udp", udp_endpoint, simulate=False
    )
    assert result.exit_code == 0, result.output
    assert "lab now runs 2.3.0 (was 1.0.0), confirmed" in result.output
    # The stock client, over the device's serial console, sees the new image running,
    # confirmed, with the hash of the image sent.
    after = _smpmgr("--port", smp_path, "image", "state-read")
    assert after.returncode == 0, after.stdout + after.stderr
    flat = after.stdout.replace("\n", "").replace(" ", "")
    from devicebridge.firmware import parse_image

    running = flat.split("ImageState(", 2)[1]  # slot 0 comes first
    assert "version='2.3.0'" in running
    assert "active=True" in running
    assert "confirmed=True" in running
    assert parse_image(data).hash.hex().upper() in running
