"""Every command with bad input: one line that says what is wrong (and what to do), no
traceback, and nothing changed in the registry or the databases.

The data directory is prepared once (a paired massager, a stored session, a trusted key,
the stores created); every case then runs in its own process against it and compares a
snapshot of every row of every store before and after.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import (
    SIM,
    SIM_MASSAGER,
    Home,
    Result,
    database_snapshot,
    isolated_env,
    one_error_line,
    run_all,
)

BRACKETS = "[bold red]face[/bold red]"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Home:
    root = tmp_path_factory.mktemp("bad-input")
    home = Home(root, isolated_env(root))
    run_all(
        home,
        [
            (*SIM, "pair", SIM_MASSAGER, "--name", "face"),
            (*SIM, "run", "firming", "--device", "face", "--duration-s", "15"),
            ("trust", "list"),
            ("treatment", "list"),
            ("programs",),
        ],
    )
    (root / "garbage.toml").write_text("[routine\nname = 'x'\n")
    (root / "exists.toml").write_text("# mine\n")
    (root / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.toml").write_bytes("name = 'caf\xe9'\n".encode("latin-1"))
    return home


CASES: list[tuple[str, tuple[str, ...], str]] = [
    ("forget a typo", ("forget", "fcae"), "no paired device named 'fcae' (paired: face"),
    (
        "forget markup",
        ("forget", BRACKETS),
        f"no paired device named '{BRACKETS}' (paired: face; did you mean 'face'?)",
    ),
    ("watch markup", ("watch", "[red]x"), "no paired device named '[red]x'"),
    ("watch no bluetooth", ("watch", "face", "--duration-s", "1"), "no Bluetooth adapter found"),
    ("scan no bluetooth", ("scan",), "no Bluetooth adapter found"),
    ("scan bad timeout", ("scan", "--timeout-s", "-1"), "Invalid value for '--timeout-s'"),
    (
        "pair unknown",
        (*SIM, "pair", "FM00000000", "--timeout-s", "1"),
        "no device found within 1 s (in range: FaceMassager-2AC1 (FM012D2AC1)",
    ),
    ("pair twice", (*SIM, "pair", SIM_MASSAGER, "--name", "other"), "already paired as 'face'"),
    ("pair blank name", (*SIM, "pair", SIM_MASSAGER, "--name", " "), "--name"),
    ("pair no port", ("pair", "--serial-port", "/nonexistent/tty0"), "/nonexistent/tty0"),
    ("run nothing", ("run",), "give either ROUTINE"),
    ("run unknown starter", (*SIM, "run", "firmng", "--device", "face"), "did you mean 'firming'?"),
    ("run missing file", (*SIM, "run", "missing.toml", "--device", "face"), "cannot read"),
    ("run not utf-8", (*SIM, "run", "latin1.toml", "--device", "face"), "not a text file"),
    (
        "run wrong kind",
        (*SIM, "run", "led_blue_blemishes", "--device", "face"),
        "'face' is a massager; this routine is for an LED mask",
    ),
    (
        "run several candidates",
        (*SIM, "run", "firming", "--device", "FaceMassager"),
        "several massagers in range match: FaceMassager-",
    ),
    ("run device typo", (*SIM, "run", "firming", "--device", "fcae"), "did you mean 'face'?"),
    ("run unknown program", (*SIM, "run", "--program", "5"), "--program 5: no such program"),
    ("validate missing", ("routine", "validate", "missing.toml"), "cannot read"),
    ("copy unknown", ("routine", "copy", "firmin"), "did you mean 'firming'?"),
    ("copy over a file", ("routine", "copy", "firming", "exists.toml"), "exists already"),
    ("sign missing", ("routine", "sign", "nope.toml", "--client", "b", "-o", "x.json"), "nope"),
    (
        "sign bad client",
        ("routine", "sign", "firming", "--client", "a/b", "-o", "x.json"),
        "cannot be a bridge id",
    ),
    ("sign without key", ("routine", "sign", "firming", "--client", "b", "-o", "x.json"), "key"),
    ("report unknown", ("report", "999"), "no session 999"),
    ("report unwritable png", ("report", "--png", "no/such/dir/x.png"), "x.png"),
    ("report unwritable csv", ("report", "--csv", "no/such/dir/x.csv"), "x.csv"),
    (
        "treatment kind",
        ("treatment", "add", "filer", "--date", "2025-01-01", "--zones", "cheek"),
        "did you mean 'filler'?",
    ),
    (
        "treatment date",
        ("treatment", "add", "filler", "--date", "yesterday", "--zones", "cheek"),
        "is not a date",
    ),
    (
        "treatment zone",
        ("treatment", "add", "filler", "--date", "2025-01-01", "--zones", "nose"),
        "unknown zone nose",
    ),
    (
        "treatment future",
        ("treatment", "add", "filler", "--date", "2999-01-01", "--zones", "cheek"),
        "is in the future",
    ),
    ("treatment remove", ("treatment", "remove", "999"), "no treatment 999"),
    ("trust bad key", ("trust", "add", "not-a-key", "--therapist", "x"), "Ed25519"),
    ("trust remove unknown", ("trust", "remove", "abc"), "no trusted key abc"),
    ("programs show unknown", ("programs", "show", "5"), "no program 5"),
    ("firmware info unknown", ("firmware", "info", "nope"), "no paired device named 'nope'"),
    ("firmware missing image", (*SIM, "firmware", "update", "face", "missing.bin"), "missing.bin"),
    ("firmware bad image", (*SIM, "firmware", "update", "face", "garbage.bin"), "garbage.bin"),
    ("status never ran", ("status",), "never run"),
    ("serve bad id", ("serve", "--bridge-id", "a/b"), "cannot be a bridge id"),
    ("serve missing routine", (*SIM, "serve", "--run", "missing.toml"), "cannot read"),
    ("missing config", ("--config", "missing.toml", "devices"), "config file not found"),
    ("unknown command", ("devics",), "did you mean 'devices'?"),
    ("history limit", ("history", "--limit", "0"), "--limit"),
    ("demo duration", ("demo", "--duration-s", "0"), "--duration-s"),
    ("pair nothing named", (*SIM, "pair"), "which one? give its serial number"),
]


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    prepared: Home, args: tuple[str, ...], expected: str
) -> None:
    before = database_snapshot(prepared.data_dir)
    result = prepared.run(*args)
    line = one_error_line(result)
    assert expected in line, str(result)
    assert database_snapshot(prepared.data_dir) == before, str(result)


def test_broker_commands_fail_in_one_line(prepared: Home) -> None:
    port = closed_port()
    before = database_snapshot(prepared.data_dir)
    result = prepared.run(
        "therapist", "status", "bridge-7", "--broker", f"127.0.0.1:{port}", "--timeout-s", "1"
    )
    assert f"127.0.0.1:{port}" in one_error_line(result)
    assert prepared.run("therapist", "keygen", "--id", "dr-lee").code == 0
    result = prepared.run(
        "routine", "push", "firming", "--client", "b", "--broker", f"127.0.0.1:{port}"
    )
    assert f"127.0.0.1:{port}" in one_error_line(result)
    assert database_snapshot(prepared.data_dir) == before


def test_an_invalid_routine_lists_its_problems_under_one_error(prepared: Home) -> None:
    result = prepared.run("routine", "validate", "garbage.toml")
    assert result.code == 1
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("garbage.toml:")  # the problems, with their lines
    assert result.stderr.strip() == "error: garbage.toml: invalid, 1 problem (above)"
    before = database_snapshot(prepared.data_dir)
    result = prepared.run(*SIM, "run", "garbage.toml", "--device", "face")
    first, *details = result.stderr.splitlines()
    assert first.startswith("error: garbage.toml: 1 problem, nothing was sent to a device")
    assert details
    assert all(line.startswith("  ") for line in details)
    assert database_snapshot(prepared.data_dir) == before


def test_names_with_brackets_print_as_they_are(home: Home) -> None:
    """A name is never markup: pairing, listing, watching and forgetting it just work."""
    result = home.run(*SIM, "pair", SIM_MASSAGER, "--name", BRACKETS)
    assert result.code == 0, str(result)
    assert f"Paired '{BRACKETS}'" in result.stdout
    assert BRACKETS in home.run("devices").stdout
    watched = home.run(*SIM, "watch", BRACKETS, "--duration-s", "1")
    assert watched.code == 0, str(watched)
    assert f"{BRACKETS}: state=" in watched.stdout
    history = home.run(*SIM, "run", "firming", "--device", BRACKETS, "--duration-s", "5")
    assert history.code == 0, str(history)
    assert f"[{BRACKETS} t=" in history.stdout  # the plain guidance lines
    assert BRACKETS in home.run("history").stdout
    forgot = home.run("forget", BRACKETS)
    assert forgot.code == 0
    assert forgot.stdout.strip() == f"Forgot '{BRACKETS}' (serial {SIM_MASSAGER})."


def _read_only(path: Path, *command: str) -> list[str]:
    """``command`` run with ``path`` read-only: a read-only bind mount as root (chmod does
    not stop root), a 0555 folder otherwise."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return list(command)
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare and mount to make a folder read-only as root")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind -o ro {path} {path}"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.decode().strip()}")
    quoted = " ".join(f"'{part}'" for part in command)
    return ["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{path}' '{path}' && exec {quoted}"]


@pytest.mark.parametrize(
    "args",
    [
        ("devices",),
        ("history",),
        ("trust", "list"),
        ("treatment", "add", "filler", "--date", "2025-01-01", "--zones", "cheek"),
        ("--simulate", "--sim-fast", "pair", SIM_MASSAGER),
    ],
    ids=["devices", "history", "trust-list", "treatment-add", "pair"],
)
def test_a_read_only_data_directory_is_one_line(home: Home, args: tuple[str, ...]) -> None:
    home.data_dir.mkdir(mode=0o700)
    argv = _read_only(home.data_dir, sys.executable, "-m", "devicebridge", *args)
    completed = subprocess.run(
        argv, env=home.env, cwd=home.root, capture_output=True, text=True, timeout=60
    )
    result = Result(args, completed.returncode, completed.stdout, completed.stderr)
    line = one_error_line(result)
    assert f"data directory: {home.data_dir} is not writable" in line
    assert "--data-dir" in line
    assert list(home.data_dir.iterdir()) == []


def test_a_data_directory_that_cannot_be_made_is_one_line(home: Home) -> None:
    blocker = home.root / "a-file"
    blocker.write_text("")
    result = home.run("--data-dir", str(blocker / "data"), "devices")
    line = one_error_line(result)
    assert f"cannot create {blocker / 'data'}" in line
    assert "(from --data-dir)" in line
    result = home.run("--data-dir", str(blocker), "history")
    assert f"{blocker} is not a directory" in one_error_line(result)
