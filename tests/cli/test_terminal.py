"""The interactive paths on a real terminal (a pty driven by pexpect): what the screen shows
while a command works, and what Ctrl-C does.

Every wait is on the screen's text (``expect``), never a sleep: a test goes on as soon as
the command has shown what it must. The simulated devices run in real time here (no
``--sim-fast``), as a user sees them.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.cli.conftest import SIM_MASSAGER, Home

pexpect = pytest.importorskip("pexpect")

ROWS, COLUMNS = 40, 100
SCREEN_TIMEOUT_S = 60.0


class Terminal:
    """One command on a pty of ROWS x COLUMNS."""

    def __init__(self, home: Home, *args: str) -> None:
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "devicebridge", *args],
            env={**home.env, "TERM": "xterm-256color"},
            cwd=str(home.root),
            encoding="utf-8",
            dimensions=(ROWS, COLUMNS),
            timeout=SCREEN_TIMEOUT_S,
        )

    def shows(self, *texts: str) -> None:
        for text in texts:
            self.child.expect_exact(text)

    def interrupt(self) -> None:
        self.child.sendintr()

    def ends(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        assert "Traceback" not in (self.child.before or "")
        return int(self.child.exitstatus if self.child.exitstatus is not None else -1)

    def output_before_end(self) -> str:
        return str(self.child.before or "")


@pytest.fixture
def paired(home: Home) -> Home:
    result = home.run("--simulate", "--sim-fast", "pair", SIM_MASSAGER, "--name", "face")
    assert result.code == 0, str(result)
    return home


def test_run_shows_its_live_panel_and_ctrl_c_stops_and_records(paired: Home) -> None:
    terminal = Terminal(paired, "--simulate", "run", "firming", "--device", "face")
    terminal.shows("Connecting to face")  # the spinner while it connects
    terminal.shows("Firming: cheeks, jawline, chin on face", "step", "1/5  zone: left cheek")
    terminal.shows("time left", "pressure", "(target 4-12, cap 15)")
    terminal.interrupt()
    assert terminal.ends() == 130
    assert "Stopped: the device was told to stop, and the session is recorded as stopped" in (
        terminal.output_before_end()
    )
    [session] = json.loads(paired.run("history", "--json").stdout)
    assert session["status"] == "stopped"
    assert session["device_name"] == "face"


def test_watch_ctrl_c_disconnects_and_summarises(paired: Home) -> None:
    terminal = Terminal(paired, "--simulate", "watch", "face")
    terminal.shows("Watching face", "kPa", "samples (gaps)")
    terminal.interrupt()
    assert terminal.ends() == 130
    after = terminal.output_before_end()
    assert "Stopped watching; the device was disconnected." in after
    assert "Summary" in after


def test_scan_shows_a_spinner_with_the_time_left(home: Home) -> None:
    terminal = Terminal(home, "--simulate", "scan", "--timeout-s", "3")
    terminal.shows("Scanning for devices...", "s left")
    terminal.shows("Devices in range", "FaceMassager-2AC1", "LED mask")
    assert terminal.ends() == 0


def test_firmware_update_ctrl_c_says_how_to_resume_and_the_same_command_resumes(
    paired: Home,
) -> None:
    image = paired.root / "app.bin"
    built = paired.run(
        "build-image",
        "--version",
        "1.2.0",
        "--model",
        "OFC-FM1",
        "--size",
        "300000",
        "-o",
        str(image),
        program="devicebridge-sim",
    )
    assert built.code == 0, str(built)
    command = ("--simulate", "firmware", "update", "face", str(image))
    terminal = Terminal(paired, *command)
    terminal.shows("face: updating to 1.2.0", "upload 1.2.0")
    terminal.shows("- uploading")
    # Past the first request (which goes alone, and which a resume sends again anyway).
    terminal.child.expect(r"[1-9][0-9]+\.[0-9]+/[0-9.]+ kB")
    terminal.interrupt()
    assert terminal.ends() == 130
    text = " ".join(terminal.output_before_end().split())
    assert "interrupted while uploading: face keeps the" in text
    assert "to resume from there, run the same command again: devicebridge" in text
    assert f"firmware update face {image}" in text

    resumed = Terminal(paired, *command)
    resumed.shows("resuming at", "face now runs 1.2.0 (was 1.0.0), confirmed")
    assert resumed.ends() == 0


def test_serve_shows_a_full_screen_view_and_stops_on_ctrl_c(home: Home) -> None:
    terminal = Terminal(home, "--simulate", "serve", "--bridge-id", "bridge-7")
    terminal.shows("devicebridge serve", "bridge-7", "broker", "none (local only")
    terminal.shows("outbox", "Devices", "FaceMassager-2AC1", "LedMask-3219", "connected")
    terminal.shows("Ctrl-C stops the bridge")
    terminal.interrupt()
    assert terminal.ends() == 0
    assert "bridge bridge-7 stopped" in terminal.output_before_end()
