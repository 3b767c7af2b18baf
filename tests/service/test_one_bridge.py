"""Two `devicebridge serve` on one data directory: the second is refused, `status` is right."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from devicebridge.cli import main
from devicebridge.service.status import write_status_file
from tests.service.conftest import BRIDGE, WAIT_S

SERVE = "from devicebridge.cli import main; main()"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "config.toml").write_text(
        f'simulate = true\nsim_massagers = 1\nsim_masks = 0\nbridge_id = "{BRIDGE}"\n'
    )
    monkeypatch.setenv("DEVICEBRIDGE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("DEVICEBRIDGE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


async def serve() -> asyncio.subprocess.Process:
    # The environment (config, data dir) is inherited from the monkeypatched one.
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVE,
        "serve",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


def status() -> str:
    result = CliRunner().invoke(main, ["status"])
    return " ".join(result.output.split())


async def wait_running(pid: int) -> None:
    """Until the bridge ``pid`` runs and has written its status file."""
    async with asyncio.timeout(WAIT_S):
        while f"running, pid {pid}, updated" not in status():  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)  # polling another process's files


async def stop(process: asyncio.subprocess.Process, signum: int) -> None:
    if process.returncode is None:
        process.send_signal(signum)
    async with asyncio.timeout(WAIT_S):
        await process.communicate()


async def test_a_second_serve_is_refused_at_once_and_status_follows_the_lock(env: Path) -> None:
    first = await serve()
    try:
        await wait_running(first.pid)
        second = await serve()
        try:
            async with asyncio.timeout(WAIT_S):
                _, stderr = await second.communicate()
        finally:
            await stop(second, signal.SIGKILL)
        assert second.returncode == 1
        lines = stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert f"pid {first.pid}" in lines[0]
        assert "already running" in lines[0]
        assert first.returncode is None  # the first one was not disturbed
        assert f"running, pid {first.pid}" in status()
    finally:
        await stop(first, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    # Killed: its status file still says "running", the lock says otherwise.
    assert "not running (last: running)" in status()
    third = await serve()
    try:
        await wait_running(third.pid)
    finally:
        await stop(third, signal.SIGTERM)
    assert third.returncode == 0
    assert "not running (last: stopped)" in status()


def test_status_trusts_the_lock_not_a_pid_that_lives_on(env: Path) -> None:
    # A bridge killed long ago: its pid now belongs to another process (here: this one).
    write_status_file(
        env,
        {
            "bridge_id": BRIDGE,
            "state": "running",
            "pid": os.getpid(),
            "updated_at": "2026-11-23T12:00:00+00:00",
            "outbox_depth": 0,
            "mqtt": {"configured": False, "host": None, "port": None, "connected": False},
            "devices": [],
        },
    )
    assert "not running (last: running)" in status()
