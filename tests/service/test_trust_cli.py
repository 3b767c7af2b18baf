"""`trust add` binds a key to one therapist; `routine sign` keeps within the maximum validity."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from devicebridge.cli import main
from devicebridge.core.signed_program import parse_envelope
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
from tests.service.conftest import ROUTINES, Therapist


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DEVICEBRIDGE_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("DEVICEBRIDGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DEVICEBRIDGE_CONFIG", str(tmp_path / "config.toml"))
    path = tmp_path / "config.toml"
    path.write_text("")
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps long error lines


def test_a_key_cannot_be_rebound_to_another_therapist(config: Path, tmp_path: Path) -> None:
    lee = Therapist("dr-lee")
    assert invoke("trust", "add", lee.public_b64, "--therapist", "dr-lee")[0] == 0
    # Adding it again for the same therapist changes nothing and is fine.
    assert invoke("trust", "add", lee.public_b64, "--therapist", "dr-lee")[0] == 0

    code, out = invoke("trust", "add", lee.public_b64, "--therapist", "dr-kim")

    assert code == 1, out
    assert f"key {lee.key_id} is already trusted for dr-lee" in out
    assert f"devicebridge trust remove {lee.key_id}" in out
    store = ProgramStore(tmp_path / "data" / PROGRAMS_FILENAME)
    try:
        assert [(k.key_id, k.therapist_id) for k in store.trusted_keys()] == [
            (lee.key_id, "dr-lee")
        ]
    finally:
        store.close()


def sign(tmp_path: Path, *options: str) -> tuple[int, str]:
    return invoke(
        "routine",
        "sign",
        str(ROUTINES / "firming.toml"),
        "--client",
        "bridge-7",
        "-o",
        str(tmp_path / "signed.json"),
        *options,
    )


def test_signing_beyond_the_maximum_validity_is_refused(config: Path, tmp_path: Path) -> None:
    assert invoke("therapist", "keygen", "--id", "dr-lee")[0] == 0

    code, out = sign(tmp_path, "--valid-days", "36500")
    assert code == 2, out
    assert "36500" in out
    assert "30 days" in out
    assert "max_validity_days" in out
    assert not (tmp_path / "signed.json").exists()

    assert sign(tmp_path, "--valid-days", "30")[0] == 0
    metadata = parse_envelope((tmp_path / "signed.json").read_bytes()).metadata
    assert metadata.expires_at > metadata.issued_at

    # The configured maximum applies (here: longer than the default).
    config.write_text("[programs]\nmax_validity_days = 90\n")
    assert sign(tmp_path, "--valid-days", "60")[0] == 0
    code, out = sign(tmp_path, "--valid-days", "91")
    assert code == 2, out
    assert "90 days" in out


@pytest.mark.parametrize("value", ["0", "-1", "1e400", "400", "true", '"30"'])
def test_an_invalid_maximum_validity_names_the_setting(
    config: Path, tmp_path: Path, value: str
) -> None:
    assert invoke("therapist", "keygen", "--id", "dr-lee")[0] == 0
    config.write_text(f"[programs]\nmax_validity_days = {value}\n")
    code, out = sign(tmp_path)
    assert code == 1, out
    assert "programs.max_validity_days" in out
