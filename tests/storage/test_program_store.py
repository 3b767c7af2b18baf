"""The program store on real SQLite files: instants in UTC (also in databases written by
earlier versions), and trusted keys bound to one therapist."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from devicebridge.errors import KeyBoundError
from devicebridge.storage.programs import ProgramStore

WEST = timezone(timedelta(hours=-12))

# The schema of the first release, which stored times with whatever offset they came with.
FIRST_SCHEMA = """
CREATE TABLE trusted_keys (key_id TEXT PRIMARY KEY, therapist_id TEXT NOT NULL,
    public_key TEXT NOT NULL, added_at TEXT NOT NULL);
CREATE TABLE used_nonces (nonce TEXT PRIMARY KEY, expires_at TEXT NOT NULL);
CREATE TABLE programs (id INTEGER PRIMARY KEY, therapist_id TEXT NOT NULL,
    key_id TEXT NOT NULL, program_version TEXT NOT NULL, routine_name TEXT NOT NULL,
    device_kind TEXT NOT NULL, program_text TEXT NOT NULL, nonce TEXT NOT NULL,
    received_at TEXT NOT NULL, expires_at TEXT NOT NULL);
CREATE TABLE installations (program_id INTEGER NOT NULL REFERENCES programs (id),
    device_serial TEXT NOT NULL, installed_at TEXT NOT NULL,
    PRIMARY KEY (program_id, device_serial));
"""


def accept(store: ProgramStore, nonce: str, expires_at: datetime, now: datetime) -> int:
    return store.accept(
        therapist_id="dr-lee",
        key_id="k",
        program_version="1",
        routine_name="Firming",
        device_kind="massager",
        program_text="[routine]",
        nonce=nonce,
        expires_at=expires_at,
        now=now,
    )


def test_instants_are_stored_in_utc_and_pruning_compares_instants(tmp_path: Path) -> None:
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    with ProgramStore(tmp_path / "p.sqlite3") as store:
        # Still valid for eight hours, handed over at UTC-12.
        accept(store, "west", (now + timedelta(hours=8)).astimezone(WEST), now)
        accept(store, "other", now + timedelta(days=1), now + timedelta(minutes=1))
        assert store.nonce_seen("west")
        (program, _) = store.programs()
        assert program.expires_at == now + timedelta(hours=8)
        assert program.expires_at.utcoffset() == timedelta(0)
        with pytest.raises(ValueError, match="time zone"):
            accept(store, "naive", datetime(2026, 11, 30), now)


def test_a_database_of_the_first_release_is_migrated_to_utc(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite3"
    now = datetime.now(UTC).replace(microsecond=0)
    valid_until = (now + timedelta(hours=8)).astimezone(WEST).isoformat()
    old = sqlite3.connect(path)
    old.executescript(FIRST_SCHEMA)
    old.execute("INSERT INTO used_nonces VALUES ('west', ?)", (valid_until,))
    old.execute(
        "INSERT INTO programs VALUES (1, 'dr-lee', 'k', '1', 'Firming', 'massager', '', 'west',"
        " ?, ?)",
        ((now - timedelta(hours=1)).astimezone(WEST).isoformat(), valid_until),
    )
    old.execute("INSERT INTO trusted_keys VALUES ('k', 'dr-lee', 'AAAA', ?)", (valid_until,))
    old.execute("INSERT INTO installations VALUES (1, 'FM-1', ?)", (valid_until,))
    old.commit()
    old.close()

    with ProgramStore(path) as store:
        (program,) = store.programs()
        assert program.expires_at == now + timedelta(hours=8)
        assert program.received_at == now - timedelta(hours=1)
        assert program.installed_on == ("FM-1",)
        # Storing the next program prunes expired nonces: this one is not expired.
        accept(store, "next", now + timedelta(days=1), now)
        assert store.nonce_seen("west")
        assert store.trusted_keys()[0].added_at == now + timedelta(hours=8)
    raw = sqlite3.connect(path)
    try:
        texts = [t for (t,) in raw.execute("SELECT expires_at FROM used_nonces")]
        texts += [t for (t,) in raw.execute("SELECT expires_at || received_at FROM programs")]
        texts += [t for (t,) in raw.execute("SELECT added_at FROM trusted_keys")]
        texts += [t for (t,) in raw.execute("SELECT installed_at FROM installations")]
    finally:
        raw.close()
    assert texts
    assert not any("-12:00" in text for text in texts), texts
    # Opening again is a no-op.
    with ProgramStore(path) as store:
        assert store.nonce_seen("west")


def test_a_trusted_key_stays_bound_to_its_therapist(tmp_path: Path) -> None:
    with ProgramStore(tmp_path / "p.sqlite3") as store:
        store.trust("k1", "dr-lee", "AAAA")
        store.trust("k1", "dr-lee", "AAAA")  # the same binding again: nothing changes
        with pytest.raises(KeyBoundError, match="already trusted for dr-lee") as info:
            store.trust("k1", "dr-kim", "AAAA")
        assert info.value.therapist_id == "dr-lee"
        store.trust("k2", "dr-lee", "BBBB")  # a therapist may have several keys
        assert [(k.key_id, k.therapist_id) for k in store.trusted_keys()] == [
            ("k1", "dr-lee"),
            ("k2", "dr-lee"),
        ]
        assert store.trusted_key("k2") is not None
        assert store.trusted_key("nope") is None
