"""Recorded treatments: removing a wrong one, future dates, one blocking duration everywhere."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from devicebridge.cli import main
from devicebridge.core.admission import Treatment, check_admission
from devicebridge.core.cooldown import BlockKind, local_time, routine_block, treatment_blocks
from devicebridge.core.policy import default_policy, parse_policy
from devicebridge.core.routine import DeviceKindName, parse_routine

ROUTINES = resources.files("devicebridge") / "data" / "routines"
POLICY_TEXT = (resources.files("devicebridge") / "data" / "default_policy.toml").read_text("utf-8")
NOW = datetime(2026, 11, 23, 18, 0)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("DEVICEBRIDGE_CONFIG", raising=False)
    monkeypatch.delenv("DEVICEBRIDGE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(
            main,
            ["--simulate", "--sim-fast", "--sim-seed", "42", "--data-dir", str(tmp_path), *args],
            catch_exceptions=False,
        )

    return run


def days_ago(days: float) -> str:
    return (datetime.now() - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M")


def massager_name(invoke) -> str:  # type: ignore[no-untyped-def]
    return next(
        d["name"] for d in json.loads(invoke("scan", "--json").output) if d["kind"] == "massager"
    )


def test_a_wrongly_dated_treatment_can_be_removed_and_blocks_no_more(invoke) -> None:  # type: ignore[no-untyped-def]
    added = invoke("treatment", "add", "filler", "--date", days_ago(1), "--zones", "cheek")
    assert added.exit_code == 0, added.output
    (entry,) = json.loads(invoke("treatment", "list", "--json").output)
    name = massager_name(invoke)
    refused = invoke("run", "firming", "--device", name, "--duration-s", "1", "--mode", "host")
    assert refused.exit_code == 1
    assert "filler on cheek" in flat(refused.output)

    removed = invoke("treatment", "remove", str(entry["id"]))
    assert removed.exit_code == 0, removed.output
    assert f"Removed treatment {entry['id']}: filler on cheek" in flat(removed.output)
    assert json.loads(invoke("treatment", "list", "--json").output) == []
    again = invoke("treatment", "remove", str(entry["id"]))
    assert again.exit_code == 1
    assert f"no treatment {entry['id']}" in flat(again.output)

    ran = invoke("run", "firming", "--device", name, "--duration-s", "1", "--mode", "host")
    assert ran.exit_code == 0, ran.output
    assert json.loads(invoke("history", "--json").output)[0]["status"] != "refused"


def test_a_future_date_is_refused_unless_asked_for(invoke) -> None:  # type: ignore[no-untyped-def]
    future = (datetime.now() + timedelta(days=30)).strftime("%Y-%m-%d")
    refused = invoke("treatment", "add", "filler", "--date", future, "--zones", "cheek")
    assert refused.exit_code == 1
    assert "in the future" in flat(refused.output)
    assert "--allow-future" in flat(refused.output)
    assert json.loads(invoke("treatment", "list", "--json").output) == []

    planned = invoke(
        "treatment", "add", "filler", "--date", future, "--zones", "cheek", "--allow-future"
    )
    assert planned.exit_code == 0, planned.output
    assert "planned" in flat(planned.output)
    (entry,) = json.loads(invoke("treatment", "list", "--json").output)
    performed = datetime.fromisoformat(entry["performed_at"])
    assert entry["blocked_until"]["massage"] == (performed + timedelta(hours=336)).isoformat()
    assert entry["blocked_until"]["any_routine"] is None


def test_add_list_and_refusal_state_the_same_block(invoke) -> None:  # type: ignore[no-untyped-def]
    # Botulinum toxin: massage_block_h 24, facial_block_h 168 (no routine at all): massage
    # of the zone is blocked for 168 h, not 24.
    added = invoke(
        "treatment", "add", "botulinum_toxin", "--date", days_ago(2), "--zones", "forehead"
    )
    assert added.exit_code == 0, added.output
    said = flat(added.output)
    blocks = re.findall(
        r"(massage of|any routine on) these zones is blocked for (\S+) h, until ([\d-]+ [\d:]+)",
        said,
    )
    assert [(what, hours) for what, hours, _ in blocks] == [
        ("massage of", "168"),
        ("any routine on", "168"),
    ]
    until = blocks[0][2]

    (entry,) = json.loads(invoke("treatment", "list", "--json").output)
    assert local_time(datetime.fromisoformat(entry["blocked_until"]["massage"])) == until
    assert local_time(datetime.fromisoformat(entry["blocked_until"]["any_routine"])) == until
    table = flat(invoke("treatment", "list").output)
    assert "massage blocked until" in table
    assert until in table

    name = massager_name(invoke)
    refused = invoke("run", "lymphatic_drainage", "--device", name, "--mode", "host")
    assert refused.exit_code == 1
    assert f"massage of these zones is blocked for 168 h, until {until}" in flat(refused.output)
    assert "cooldowns.botulinum_toxin.facial_block_h = 168" in flat(refused.output)


def test_a_massage_block_is_the_longer_of_the_two_limits() -> None:
    # A policy whose facial block is shorter than its massage block (12 h against 24 h).
    text = POLICY_TEXT.replace(
        'facial_block_h = { value = 168, source = "botox_aftercare" }',
        'facial_block_h = { value = 12, source = "botox_aftercare" }',
    )
    policy = parse_policy(text)
    massage, any_routine = treatment_blocks(policy, "botulinum_toxin", NOW)
    assert (massage.kind, massage.hours) == (BlockKind.MASSAGE, 24)
    assert (any_routine.kind, any_routine.hours) == (BlockKind.ANY_ROUTINE, 12)
    botox = Treatment("botulinum_toxin", NOW, ("forehead",))
    drainage = parse_routine((ROUTINES / "lymphatic_drainage.toml").read_text("utf-8"), policy)
    led = parse_routine((ROUTINES / "led_red_near_infrared.toml").read_text("utf-8"), policy)
    at = NOW + timedelta(hours=1)  # both blocks run: the massage refusal names the longer
    (refusal,) = check_admission(drainage, policy, now=at, history=[], treatments=[botox]).refusals
    assert refusal.allowed_from == NOW + timedelta(hours=24)
    assert "massage of these zones is blocked for 24 h" in refusal.message
    (led_refusal,) = check_admission(led, policy, now=at, history=[], treatments=[botox]).refusals
    assert led_refusal.allowed_from == NOW + timedelta(hours=12)
    later = NOW + timedelta(hours=13)  # the facial block is over, the massage block is not
    assert check_admission(led, policy, now=later, history=[], treatments=[botox]).allowed
    assert not check_admission(drainage, policy, now=later, history=[], treatments=[botox]).allowed
    assert routine_block(policy, "botulinum_toxin", NOW, DeviceKindName.LED_MASK) == any_routine


def test_a_treatment_blocks_nothing_before_its_date() -> None:
    policy = default_policy()
    planned = Treatment("filler", NOW + timedelta(days=3), ("cheek",))
    firming = parse_routine((ROUTINES / "firming.toml").read_text("utf-8"), policy)
    assert check_admission(firming, policy, now=NOW, history=[], treatments=[planned]).allowed
    later = check_admission(
        firming, policy, now=NOW + timedelta(days=4), history=[], treatments=[planned]
    )
    assert [r.allowed_from for r in later.refusals] == [NOW + timedelta(days=3 + 14)]
