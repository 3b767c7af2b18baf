"""The client's commands for pushed programs, as a user runs them: `programs`, and
`run --program ID` both on its own and while `serve` holds the devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore

from .test_local_api import SHORT

READY_TIMEOUT_S = 30.0  # a hang net for the bridge process to start; not a correctness wait
SEED = "7"
DEVICEBRIDGE = str(Path(sys.executable).parent / "devicebridge")


def cli(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [DEVICEBRIDGE, "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def store_program(data_dir: Path, text: bytes = SHORT) -> int:
    store = ProgramStore(data_dir / PROGRAMS_FILENAME)
    try:
        return store.accept(
            therapist_id="dr-lee",
            key_id="0123456789abcdef",
            program_version="2",
            routine_name="Short cheek",
            device_kind="massager",
            program_text=text.decode(),
            nonce=os.urandom(8).hex(),
            expires_at=datetime.now(UTC) + timedelta(days=7),
        )
    finally:
        store.close()


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """`devicebridge serve` on simulated devices in a process of its own."""
    data_dir = tmp_path / "data"
    process = subprocess.Popen(
        [
            DEVICEBRIDGE,
            "--simulate",
            "--sim-fast",
            "--sim-seed",
            SEED,
            "--data-dir",
            str(data_dir),
            "serve",
            "--bridge-id",
            "bridge-t",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            status = cli(data_dir, "status", "--json", check=False)
            if status.returncode == 0:
                body = json.loads(status.stdout)
                ready = [d for d in body.get("devices", []) if d["state"] == "ready"]
                if body["alive"] and ready and any(d["kind"] == "massager" for d in ready):
                    break
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "serve did not get ready"
            time.sleep(0.1)  # polls another process's status file until it is ready
        name = next(d["name"] for d in body["devices"] if d["kind"] == "massager")
        yield data_dir, name
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def test_run_program_while_serve_runs_goes_through_the_bridge(
    serving: tuple[Path, str],
) -> None:
    data_dir, device = serving
    program_id = store_program(data_dir)
    done = cli(data_dir, "run", "--program", str(program_id), "--device", device)
    assert "completed" in done.stdout
    assert "Short cheek" in done.stdout
    listed = json.loads(cli(data_dir, "programs", "list", "--json").stdout)
    (row,) = listed
    assert (row["program_id"], row["sessions"], row["completed"]) == (program_id, 1, 1)
    history = json.loads(cli(data_dir, "history", "--json").stdout)
    assert history[0]["status"] == "completed"
    # Running it on the bridge's devices with another policy or port makes no sense.
    refused = cli(
        data_dir, "run", "--program", str(program_id), "--serial-port", "/dev/null", check=False
    )
    assert refused.returncode == 1
    assert "drop --policy/--serial-port" in refused.stderr


def test_run_program_on_its_own_records_it_against_the_program(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    program_id = store_program(data_dir)
    names = cli(data_dir, "--simulate", "--sim-seed", SEED, "scan", "--json", check=False)
    assert names.returncode == 0, names.stderr
    device = next(d["name"] for d in json.loads(names.stdout) if d["kind"] == "massager")
    done = cli(
        data_dir,
        "--simulate",
        "--sim-fast",
        "--sim-seed",
        SEED,
        "run",
        "--program",
        str(program_id),
        "--device",
        device,
    )
    assert "completed" in done.stdout
    (row,) = json.loads(cli(data_dir, "programs", "--json").stdout)
    assert (row["sessions"], row["completed"]) == (1, 1)
    shown = cli(data_dir, "programs", "show", str(program_id)).stdout
    assert 'zone = "cheek_left"' in shown
    missing = cli(data_dir, "run", "--program", "99", "--device", device, check=False)
    assert missing.returncode == 1
    assert "no such program" in missing.stderr
