"""The therapist and trust commands, and `devicebridge status`, through click."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from devicebridge.cli import main
from devicebridge.core.signed_program import parse_envelope
from devicebridge.service.status import write_status_file
from tests.service.conftest import ROUTINES


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("DEVICEBRIDGE_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("DEVICEBRIDGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DEVICEBRIDGE_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text("")
    return {}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps long error lines


def test_keygen_sign_and_trust_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    code, out = invoke("therapist", "keygen", "--id", "dr-lee")
    assert code == 0, out
    key_file = tmp_path / "keys" / "dr-lee.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    words = out.split()
    public = words[words.index("public") + 2]
    kid = words[words.index("id:") + 1]
    assert invoke("therapist", "keygen", "--id", "dr-lee")[0] == 1  # never overwritten

    envelope = tmp_path / "firming.signed.json"
    code, out = invoke(
        "routine",
        "sign",
        str(ROUTINES / "firming.toml"),
        "--client",
        "bridge-7",
        "--valid-days",
        "3",
        "-o",
        str(envelope),
    )
    assert code == 0, out
    signed = parse_envelope(envelope.read_bytes())
    assert (signed.key_id, signed.metadata.client_id) == (kid, "bridge-7")
    assert signed.program == (ROUTINES / "firming.toml").read_bytes()

    assert invoke("trust", "add", public, "--therapist", "dr-lee") == (
        0,
        f"trusted key {kid} of dr-lee",
    )
    code, out = invoke("trust", "list")
    assert kid in out
    assert "dr-lee" in out
    assert invoke("trust", "remove", kid)[0] == 0
    code, out = invoke("trust", "remove", kid)
    assert code == 1
    assert f"no trusted key {kid}" in out


def test_bad_inputs_say_what_is_wrong(env: dict[str, str], tmp_path: Path) -> None:
    code, out = invoke("trust", "add", "not-a-key", "--therapist", "x")
    assert code == 2
    assert "not an Ed25519 public key" in out
    code, out = invoke(
        "routine",
        "sign",
        str(ROUTINES / "firming.toml"),
        "--client",
        "b",
        "-o",
        str(tmp_path / "x.json"),
    )
    assert code == 1
    assert "no therapist key" in out
    unsafe = tmp_path / "unsafe.toml"
    unsafe.write_text(
        (ROUTINES / "firming.toml").read_text().replace("max = 12.0", "max = 40.0", 1)
    )
    invoke("therapist", "keygen")
    code, out = invoke(
        "routine", "sign", str(unsafe), "--client", "b", "-o", str(tmp_path / "x.json")
    )
    assert code == 1
    assert "pressure_kpa" in out
    code, out = invoke(
        "routine", "sign", str(unsafe), "--client", "a/b", "-o", str(tmp_path / "x.json")
    )
    assert code == 2
    assert "without '/'" in out


def test_status_reads_the_status_file(env: dict[str, str], tmp_path: Path) -> None:
    code, out = invoke("status")
    assert code == 1
    assert "never run" in out
    write_status_file(
        tmp_path / "data",
        {
            "bridge_id": "bridge-7",
            "state": "running",
            "pid": 2**22 + 12345,
            "updated_at": "2026-11-23T12:00:00+00:00",
            "outbox_depth": 3,
            "mqtt": {"configured": True, "host": "h", "port": 1883, "connected": False},
            "devices": [
                {
                    "serial": "FM-1",
                    "name": "face",
                    "kind": "massager",
                    "state": "ready",
                    "battery_percent": 80,
                    "session_id": None,
                }
            ],
        },
    )
    code, out = invoke("status")
    assert code == 0, out
    assert "not running (last: running)" in out  # that pid is gone: a killed service
    assert "h:1883 disconnected" in out
    assert "FM-1" in out
    assert "80%" in out
    code, out = invoke("status", "--json")
    assert json.loads(out)["outbox_depth"] == 3
