"""Health data and keys stay private: 0700 folders, 0600 files, also for older installs."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from devicebridge.cli import main
from devicebridge.service.status import write_status_file
from devicebridge.storage.lock import acquire
from devicebridge.storage.outbox import OUTBOX_FILENAME, Outbox
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
from devicebridge.storage.registry import REGISTRY_FILENAME, DeviceRegistry
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStore
from tests.service.conftest import ROUTINES

DATABASES = (SESSIONS_FILENAME, PROGRAMS_FILENAME, OUTBOX_FILENAME, REGISTRY_FILENAME)


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most systems ship (022): files would be world-readable by default."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DEVICEBRIDGE_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("DEVICEBRIDGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DEVICEBRIDGE_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text("")
    return tmp_path / "data"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def open_every_store(data_dir: Path) -> None:
    """What the bridge creates in its data directory, each opened and written once."""
    sessions = SessionStore(data_dir / SESSIONS_FILENAME)
    sessions.add_treatment("filler", datetime(2020, 1, 1, tzinfo=UTC), ["cheek"])
    programs = ProgramStore(data_dir / PROGRAMS_FILENAME)
    programs.trust("k1", "dr-lee", "AAAA")
    outbox = Outbox(data_dir / OUTBOX_FILENAME, bridge_id="bridge-7")
    outbox.append("t", b"x")
    registry = DeviceRegistry.in_data_dir(data_dir)
    registry.list_devices()
    try:
        # Every store is open: their -wal and -shm files exist now.
        names = {p.name for p in data_dir.iterdir() if p.name.startswith(DATABASES)}
        assert {f"{SESSIONS_FILENAME}-wal", f"{OUTBOX_FILENAME}-shm"} <= names
        for name in names:
            assert mode(data_dir / name) == 0o600, name
    finally:
        for store in (sessions, programs, outbox, registry):
            store.close()
    write_status_file(data_dir, {"state": "stopped"})
    with acquire(data_dir):
        pass


def test_a_new_data_dir_is_0700_and_every_file_in_it_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    open_every_store(data_dir)
    assert mode(data_dir) == 0o700
    names = {p.name for p in data_dir.iterdir()}
    assert {*DATABASES, "status.json", "bridge.lock"} <= names
    for name in names:
        assert mode(data_dir / name) == 0o600, name


def test_an_older_install_is_tightened_when_opened(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    open_every_store(data_dir)
    data_dir.chmod(0o755)
    for path in data_dir.iterdir():
        path.chmod(0o644)
    open_every_store(data_dir)
    assert mode(data_dir) == 0o700
    for path in data_dir.iterdir():
        assert mode(path) == 0o600, path.name


def test_cli_commands_create_private_files(env: Path) -> None:
    invoke("treatment", "add", "filler", "--date", "2020-01-02", "--zones", "cheek")
    invoke("devices")
    invoke("trust", "list")
    assert mode(env) == 0o700
    for name in (SESSIONS_FILENAME, REGISTRY_FILENAME, PROGRAMS_FILENAME):
        assert mode(env / name) == 0o600, name


def test_therapist_keys_live_in_a_private_folder(env: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    invoke("therapist", "keygen", "--id", "dr-lee")
    assert mode(keys) == 0o700
    assert mode(keys / "dr-lee.pem") == 0o600
    # An older install: a 0755 folder and a key left 0644 are tightened on next use.
    keys.chmod(0o755)
    (keys / "dr-lee.pem").chmod(0o644)
    signed = tmp_path / "signed.json"
    invoke("routine", "sign", str(ROUTINES / "firming.toml"), "--client", "b-1", "-o", str(signed))
    assert mode(keys) == 0o700
    assert mode(keys / "dr-lee.pem") == 0o600
