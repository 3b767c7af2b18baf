"""Every command the README and docs/ show, checked against the real command line, so that
the documentation cannot drift from what the commands do.

1. Every ``devicebridge`` and ``devicebridge-sim`` line of a ``bash`` block parses: the
   command exists, and so does every option, with the arguments it needs.
2. The documents are then run, block by block in their order, as a reader would type them,
   against simulated devices (``--simulate --sim-fast`` for ``devicebridge``), a private
   Mosquitto for the broker examples, and simulated serial/UDP ports for the firmware
   examples. A command that runs until Ctrl-C (``serve``) runs in the background until
   the document is done with it. The few that cannot run here are listed in NOT_RUN with
   the reason and the test that covers them; a documented command that is neither run
   nor listed fails the test.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest

from devicebridge.cli import main as devicebridge_main
from simulators.cli import main as sim_main
from tests.broker import Mosquitto, free_port
from tests.cli.conftest import SIM, Home

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("devicebridge", "devicebridge-sim")
WAIT_S = 60.0

# Commands shown but not run here: (document, the command's first words) -> why, and where
# they are run instead.
NOT_RUN: dict[tuple[str, str], str] = {
    ("README.md", "devicebridge clinic serve"): "a web server on a fixed port: tests/clinic",
    ("clinic.md", "devicebridge clinic serve"): "a web server on a fixed port: tests/clinic",
}


@dataclass(frozen=True)
class DocCommand:
    document: str
    line: int
    program: str
    args: tuple[str, ...]

    @property
    def words(self) -> str:
        return " ".join((self.program, *self.args))

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.words}"


def documented_commands(path: Path) -> list[DocCommand]:
    """The devicebridge commands of the ``bash`` blocks of one document, in order."""
    commands: list[DocCommand] = []
    language: str | None = None
    pending, start = "", 0
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if raw.startswith("```"):
            language = None if language is not None else (raw[3:].strip() or "text")
            continue
        if language not in ("bash", "sh"):
            continue
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = pending + raw, ""
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if not words:
                continue
            program = Path(words[0]).name
            if program in PROGRAMS:
                commands.append(DocCommand(path.name, start, program, tuple(words[1:])))
    return commands


ALL = [command for document in DOCUMENTS for command in documented_commands(document)]


def test_the_documents_show_commands() -> None:
    shown = {c.document for c in ALL}
    assert {"README.md", "firmware.md", "qa.md", "clinic.md"} <= shown


@pytest.mark.parametrize("command", ALL, ids=[f"{c.document}:{c.line}" for c in ALL])
def test_every_documented_command_parses(command: DocCommand) -> None:
    root = devicebridge_main if command.program == "devicebridge" else sim_main
    _parse(root, command.program, list(command.args), None)


def _parse(cmd: click.Command, name: str, args: list[str], parent: click.Context | None) -> None:
    try:
        ctx = cmd.make_context(name, args, parent=parent)
    except click.exceptions.Exit as exc:  # an eager option that answers at once (--version)
        if exc.exit_code != 0:
            raise
        return
    except click.BadParameter as exc:
        if "does not exist" in exc.format_message():
            return  # a file the document's reader has (a CA certificate): the option is right
        raise
    if isinstance(cmd, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return
        sub_name, sub, sub_args = cmd.resolve_command(ctx, rest)
        assert sub is not None
        assert sub_name is not None
        _parse(sub, sub_name, sub_args, ctx)


# --------------------------------------------------------------------------- running them


@dataclass
class Reader:
    """Runs a document's commands the way its reader would, in one home and folder."""

    home: Home
    broker: Mosquitto
    cwd: Path
    substitutions: dict[str, str] = field(default_factory=dict)
    background: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    ran: list[DocCommand] = field(default_factory=list)

    def argv(self, command: DocCommand) -> list[str]:
        args = [self.substitute(a) for a in command.args]
        if command.program == "devicebridge":
            return [sys.executable, "-m", "devicebridge", *SIM, *args]
        code = "from simulators.cli import main; main(prog_name='devicebridge-sim')"
        return [sys.executable, "-c", code, *args]

    def substitute(self, arg: str) -> str:
        for old, new in self.substitutions.items():
            arg = arg.replace(old, new)
        if arg.startswith("~/"):  # as the reader's shell expands it
            return str(Path(self.home.env["HOME"]) / arg[2:])
        return arg

    def run(self, command: DocCommand, *extra: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [*self.argv(command), *extra],
            cwd=self.cwd,
            env=self.home.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=WAIT_S * 3,
        )
        assert result.returncode == 0, (
            f"{command}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr}"
        self.ran.append(command)
        return result.stdout

    def start(self, key: str, command: DocCommand, *extra: str, ready: str) -> list[str]:
        """Start a command that runs until stopped (its output goes to a file, so that it
        never blocks on a full pipe); return its output lines once one matches ``ready``."""
        log = self.home.root / f"{key}.log"
        with log.open("w") as handle:
            process = subprocess.Popen(
                [*self.argv(command), *extra],
                cwd=self.cwd,
                env=self.home.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.background[key] = process
        self.ran.append(command)
        deadline = time.monotonic() + WAIT_S
        while True:
            lines = log.read_text().splitlines()
            if any(re.search(ready, line) for line in lines):
                return lines
            assert process.poll() is None, f"{command} ended:\n" + "\n".join(lines)
            assert time.monotonic() < deadline, f"{command}: no {ready!r}:\n" + "\n".join(lines)
            time.sleep(0.1)  # waiting for the command's own output, not for time to pass

    def stop(self, key: str) -> None:
        process = self.background.pop(key)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert process.returncode in (0, -signal.SIGINT), process.returncode

    def close(self) -> None:
        for key in list(self.background):
            self.stop(key)


@pytest.fixture
def reader(home: Home, mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Reader]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    home.env["HOME"] = str(tmp_path / "home")
    home.env["DEVICEBRIDGE_CLINIC_PASSWORD"] = "correct horse battery"
    reader = Reader(home, mosquitto, cwd)
    for host in ("mqtt.clinic:1883", "broker.internal:8883"):
        reader.substitutions[host] = f"127.0.0.1:{mosquitto.port}"
    try:
        yield reader
    finally:
        reader.close()


def build_image(reader: Reader, name: str, version: str = "1.2.0") -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from simulators.cli import main; main(prog_name='devicebridge-sim')",
            "build-image",
            "--version",
            version,
            "--model",
            "OFC-FM1",
            "-o",
            name,
        ],
        cwd=reader.cwd,
        env=reader.home.env,
        check=True,
        capture_output=True,
    )


def wait_for_status(reader: Reader, predicate: Callable[[dict[str, Any]], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        result = subprocess.run(
            [sys.executable, "-m", "devicebridge", "status", "--json"],
            env=reader.home.env,
            capture_output=True,
            text=True,
        )
        if result.returncode == 0 and predicate(json.loads(result.stdout)):
            return
        assert time.monotonic() < deadline, result.stdout + result.stderr
        time.sleep(0.2)  # polling a file another process writes, not a correctness wait


def commands_of(document: str) -> list[DocCommand]:
    return [c for c in ALL if c.document == document]


def check_all_ran(reader: Reader, document: str) -> None:
    missing = [
        str(c)
        for c in commands_of(document)
        if c not in reader.ran and (document, _first_words(c)) not in NOT_RUN
    ]
    assert not missing, "documented but neither run nor listed in NOT_RUN:\n" + "\n".join(missing)


def _first_words(command: DocCommand) -> str:
    return " ".join((command.program, *command.args[:2]))


def test_the_readme_runs_as_written(reader: Reader) -> None:
    build_image(reader, "app.bin")
    for command in commands_of("README.md"):
        words = command.words
        if (command.document, _first_words(command)) in NOT_RUN:
            continue
        if words.startswith("devicebridge demo"):
            reader.run(command, "--fast", "--duration-s", "4")
        elif words.startswith("devicebridge watch"):
            reader.run(command, "--duration-s", "1")
        elif words.startswith("devicebridge therapist keygen"):
            out = reader.run(command)
            reader.substitutions["<PUBLIC_KEY>"] = re.search(r"public key:\s+(\S+)", out)[1]  # type: ignore[index]
        elif words.startswith("devicebridge serve"):
            reader.start("serve", command, ready=r"^\{")  # piped: JSON status lines
            wait_for_status(
                reader,
                lambda status: (
                    bool(status["mqtt"]["connected"])
                    and [d["state"] for d in status["devices"]] == ["ready"]
                ),
            )
        elif words.startswith("devicebridge routine push"):
            assert "accepted: program 1" in reader.run(command)
        elif words.startswith("devicebridge run --program"):
            out = reader.run(command)
            assert "status" in out
        elif words.startswith("devicebridge-sim serve"):
            lines = reader.start("sim-serve", command, ready=r"^mask ")
            assert len([line for line in lines if "/dev/pts/" in line]) == 3
            reader.stop("sim-serve")
        elif words.startswith("devicebridge-sim scenario run"):
            reader.cwd, cwd = ROOT, reader.cwd
            try:
                assert reader.run(command).startswith("PASS")
            finally:
                reader.cwd = cwd
        else:
            reader.run(command)
    out = subprocess.run(
        [sys.executable, "-m", "devicebridge", "history", "--json"],
        env=reader.home.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert any(row["device_name"] == "face" for row in json.loads(out))
    reader.stop("serve")
    check_all_ran(reader, "README.md")


def test_docs_firmware_runs_as_written(reader: Reader) -> None:
    for name in ("app.bin", "app-1.2.0.bin"):
        build_image(reader, name)
    reader.run(DocCommand("setup", 0, "devicebridge", ("pair", "FM012D2AC1", "--name", "face")))
    sim = DocCommand(
        "setup",
        0,
        "devicebridge-sim",
        ("serve", "--massagers", "2", "--serial", "--smp-serial", "--smp-udp-port", "0", "--fast"),
    )
    lines = reader.start("ports", sim, ready=r"^massager FM01")  # the second device's line
    wired, lab = (line.split() for line in lines if line.startswith("massager"))
    reader.substitutions["/dev/ttyACM1"] = wired[3].removeprefix("smp-serial=")
    reader.substitutions["192.0.2.7:1337"] = lab[4].removeprefix("smp-udp=")
    for name, fields in (("wired", wired), ("lab", lab)):
        pairing = ("pair", "--serial-port", fields[2], "--name", name)
        reader.run(DocCommand("setup", 0, "devicebridge", pairing))
    for command in commands_of("firmware.md"):
        if command.args[:2] == ("firmware", "update"):
            assert "now runs 1.2.0" in reader.run(command)
        else:
            reader.run(command)
    check_all_ran(reader, "firmware.md")


def test_docs_qa_runs_as_written(reader: Reader) -> None:
    data = Path(reader.home.env["HOME"]) / ".local" / "share" / "devicebridge"
    record = DocCommand(
        "setup",
        0,
        "devicebridge",
        ("--data-dir", str(data), "run", "firming", "--device", "FM012D2AC1", "--duration-s", "30"),
    )
    reader.run(record)
    control = free_port()
    tcp = free_port()
    reader.substitutions["7100"] = str(control)
    reader.substitutions["--tcp 7000"] = f"--tcp {tcp}"
    for command in commands_of("qa.md"):
        words = command.words
        if words.startswith("devicebridge-sim qa serve"):
            args = [reader.substitute(a) for a in command.args]
            args[args.index("--tcp") + 1] = str(tcp)
            moved = DocCommand(command.document, command.line, command.program, tuple(args))
            reader.start("qa", moved, ready=r"^control ")
            reader.ran.append(command)
        elif words.startswith("devicebridge-sim scenario run examples/"):
            reader.cwd, cwd = ROOT, reader.cwd
            try:
                out = reader.run(command)
            finally:
                reader.cwd = cwd
            if "--json" in command.args:
                [outcome] = json.loads(out)
                assert outcome["passed"] is True
        else:
            reader.run(command)
    check_all_ran(reader, "qa.md")


def test_docs_clinic_runs_as_written(reader: Reader) -> None:
    for command in commands_of("clinic.md"):
        if (command.document, _first_words(command)) in NOT_RUN:
            continue
        reader.run(command)
    check_all_ran(reader, "clinic.md")


def test_docs_that_show_no_commands_stay_that_way() -> None:
    """A command added to another document must be run by a test here."""
    covered = {"README.md", "firmware.md", "qa.md", "clinic.md"}
    assert {c.document for c in ALL} <= covered
