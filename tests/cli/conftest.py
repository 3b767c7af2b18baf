"""The command line as a user runs it: a new process per command, in an isolated home.

Every test here runs ``python -m devicebridge`` (what the ``devicebridge`` script runs) in
a subprocess whose config, data and key folders are private to the test, so the
developer's own files are never read or written.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SIM: tuple[str, ...] = ("--simulate", "--sim-fast", "--sim-seed", "1234")
# The simulated world of seed 1234: its first massager (README's example serial).
SIM_MASSAGER = "FM012D2AC1"
COMMAND_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"$ devicebridge {' '.join(self.argv)}\nexit {self.code}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


@dataclass
class Home:
    """Private folders for one test, and a runner for commands in them."""

    root: Path
    env: dict[str, str]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config_file(self) -> Path:
        return self.root / "config" / "devicebridge" / "config.toml"

    def run(
        self,
        *args: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = COMMAND_TIMEOUT_S,
        program: str = "devicebridge",
    ) -> Result:
        if program == "devicebridge":
            argv = [sys.executable, "-m", "devicebridge", *args]
        else:
            code = "from simulators.cli import main; main(prog_name='devicebridge-sim')"
            argv = [sys.executable, "-c", code, *args]
        completed = subprocess.run(
            argv,
            cwd=cwd or self.root,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return Result(tuple(args), completed.returncode, completed.stdout, completed.stderr)


def isolated_env(root: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEVICEBRIDGE_", "XDG_")) and k not in ("COLUMNS", "LINES")
    }
    env.update(
        {
            "HOME": str(root / "home"),
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_DATA_HOME": str(root / "share"),
            "DEVICEBRIDGE_DATA_DIR": str(root / "data"),
            "DEVICEBRIDGE_KEY_DIR": str(root / "keys"),
            # No Bluetooth stack reachable, whatever the machine has: a test that wants
            # one uses --simulate.
            "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={root / 'no-dbus-here'}",
        }
    )
    (root / "home").mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path, isolated_env(tmp_path))


def database_snapshot(data_dir: Path) -> dict[str, object]:
    """Every row of every SQLite store in ``data_dir`` (not the bytes: WAL moves them)."""
    snapshot: dict[str, object] = {}
    for path in sorted(data_dir.glob("*.sqlite3")):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = [
                row[0]
                for row in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
            ]
            snapshot[path.name] = {
                table: sorted(map(repr, db.execute(f'SELECT * FROM "{table}"'))) for table in tables
            }
        finally:
            db.close()
    snapshot["files"] = sorted(
        p.name for p in data_dir.iterdir() if not p.name.endswith(("-wal", "-shm"))
    )
    return snapshot


def one_error_line(result: Result) -> str:
    """The failure's one line on stderr (asserting there is exactly one and no traceback)."""
    assert result.code in (1, 2), str(result)
    assert "Traceback" not in result.stderr + result.stdout, str(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, str(result)
    assert lines[0].startswith("error: "), str(result)
    return lines[0]


def run_all(home: Home, commands: Sequence[Sequence[str]]) -> list[Result]:
    results = []
    for command in commands:
        result = home.run(*command)
        assert result.code == 0, str(result)
        results.append(result)
    return results
