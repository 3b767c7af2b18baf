"""Compressed telemetry: the codec round trip, a finished session compacted into a few
compressed chunks that read back the same, and a store of the old schema (raw chunks, no
encoding column) opened by this code and read by the report, CSV and FHIR paths."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import protocols as p
from devicebridge.cli import main
from devicebridge.core.policy import default_policy
from devicebridge.reporting.report import load_report, write_csv
from devicebridge.storage.sample_codec import SampleEncoding, decode_samples, encode_samples
from devicebridge.storage.sessions import _MIGRATIONS, SESSIONS_FILENAME, SessionStore
from devicebridge.storage.sqlite import connect, migrate
from devicebridge.storage.writer import StoreWriter
from tests.clinic.web import massager_samples

from .writer_jobs import append_samples_job

DTYPES = (p.MASSAGER_SAMPLE_DTYPE, p.LED_MASK_SAMPLE_DTYPE)
OLD_SCHEMA_VERSION = 2  # raw chunks only, no encoding column


def sensor_like(count: int, seed: int) -> np.ndarray:
    """Massager samples as a sensor gives them: a noisy pressure, a drifting temperature."""
    rng = np.random.default_rng(seed)
    samples = massager_samples(count, "cheek_left", 8.0)
    samples["pressure_dapa"] = 800 + rng.normal(0, 25, count).round().astype(np.int64)
    samples["skin_temperature_centi_c"] = 3000 + np.arange(count) // 50
    return samples


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(DTYPES).flatmap(
        lambda dtype: arrays(np.uint8, st.integers(1, 300).map(lambda n: n * dtype.itemsize)).map(
            lambda raw: raw.view(dtype)
        )
    )
)
def test_the_codec_gives_back_every_byte(samples: np.ndarray) -> None:
    for encoding in SampleEncoding:
        stored = encode_samples(samples, encoding)
        back = decode_samples(stored, encoding, samples.dtype, samples.shape[0])
        assert back.dtype == samples.dtype
        assert back.tobytes() == samples.tobytes()


def test_a_ramp_is_delta_coded_and_noise_is_not() -> None:
    samples = sensor_like(4000, seed=1)
    samples["battery_percent"] = 100 - np.arange(4000) // 40  # a slow ramp
    stored = encode_samples(samples, SampleEncoding.PLANES_ZLIB)
    back = decode_samples(stored, SampleEncoding.PLANES_ZLIB, samples.dtype, 4000)
    assert back.tobytes() == samples.tobytes()
    assert len(stored) < 2.5 * len(samples)  # raw: 9 bytes a sample


def open_session(store: SessionStore, rate_hz: float = 100.0) -> int:
    return store.start_session(
        routine_name="Firming",
        category="firming",
        device_serial="FM-9",
        device_kind="massager",
        sample_format=p.SampleFormat.MASSAGER_V1,
        sample_rate_hz=rate_hz,
        started_at=datetime(2026, 12, 1, 9, 0, tzinfo=UTC),
    )


def chunk_rows(path: Path) -> list[tuple[int, int, int]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(
            "SELECT first_sequence, sample_count, encoding FROM telemetry_chunks"
            " ORDER BY first_sequence"
        ).fetchall()


def test_a_compacted_session_reads_the_same_in_fewer_smaller_chunks(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    samples = sensor_like(5000, seed=2)
    with SessionStore(path) as store:
        session = open_session(store)
        for first in range(0, 3000, 25):
            store.append_samples(session, first, samples[first : first + 25])
        store.append_samples(session, 1000, samples[1000:1100])  # a backfill re-sent these
        for first in range(3200, 5000, 25):  # after a gap of 200 samples
            store.append_samples(session, first, samples[first : first + 25])
        before = store.telemetry(session)
        with contextlib.closing(sqlite3.connect(path)) as db:
            (raw_bytes,) = db.execute(
                "SELECT SUM(LENGTH(samples)) FROM telemetry_chunks"
            ).fetchone()

        assert store.compact_telemetry(session, chunk_samples=1024) == 5
        sequences, stored = store.telemetry(session)
        assert np.array_equal(sequences, before[0])
        assert stored.tobytes() == before[1].tobytes()
        # Contiguous chunks of at most 1024 samples, ending at the gap, all compressed.
        assert chunk_rows(path) == [
            (0, 1024, 1),
            (1024, 1024, 1),
            (2048, 952, 1),
            (3200, 1024, 1),
            (4224, 776, 1),
        ]
        with contextlib.closing(sqlite3.connect(path)) as db:
            (packed_bytes,) = db.execute(
                "SELECT SUM(LENGTH(samples)) FROM telemetry_chunks"
            ).fetchone()
        assert packed_bytes < raw_bytes / 3
        assert store.compact_telemetry(session) == 0  # nothing raw left


def test_the_writer_has_a_finished_session_compacted(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    samples = sensor_like(600, seed=3)
    with SessionStore(path) as store:
        session = open_session(store)
        writer = StoreWriter(store)
        writer.run_now(append_samples_job, session, 0, samples[:300])
        writer.run_now(append_samples_job, session, 300, samples[300:])
        writer.finish_session(session, status="completed", end_reason=None, summary={}).result()
        writer.wait_compacted()
        writer.close()
        assert chunk_rows(path) == [(0, 600, 1)]
        assert store.session(session).status == "completed"
        assert store.telemetry(session)[1].tobytes() == samples.tobytes()


def old_store(data_dir: Path) -> tuple[int, np.ndarray]:
    """A sessions file as the code before schema version 3 wrote it: raw chunks."""
    data_dir.mkdir()
    db = connect(data_dir / SESSIONS_FILENAME)
    migrate(db, _MIGRATIONS[:OLD_SCHEMA_VERSION])
    samples = np.concatenate(
        [massager_samples(300, "jawline_left", 12.0), massager_samples(150, "chin", 9.5)]
    )
    db.execute(
        "INSERT INTO sessions (routine_name, category, device_serial, device_kind,"
        " sample_format, sample_rate_hz, started_at, ended_at, status, end_reason,"
        " summary_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            "Firming",
            "firming",
            "FM-9",
            "massager",
            int(p.SampleFormat.MASSAGER_V1),
            100.0,
            "2026-12-01T09:00:00+00:00",
            "2026-12-01T09:00:05+00:00",
            "stopped",
            "pressure above the cap",
            json.dumps({"completion": 0.5, "contact_s": 4.5, "cap_events": 1}),
        ),
    )
    (session,) = db.execute("SELECT id FROM sessions").fetchone()
    db.executemany(
        "INSERT INTO telemetry_chunks (session_id, first_sequence, sample_count, received_at,"
        " samples) VALUES (?, ?, ?, ?, ?)",
        [
            (session, first, 50, "2026-12-01T09:00:01+00:00", samples[first : first + 50].tobytes())
            for first in range(0, 450, 50)
        ],
    )
    (version,) = db.execute("PRAGMA user_version").fetchone()
    assert version == OLD_SCHEMA_VERSION
    db.close()
    return int(session), samples


def exports(data_dir: Path, session: int, out: Path) -> tuple[str, dict[str, object]]:
    """The CSV and the FHIR Bundle the CLI writes for ``session``."""
    out.mkdir()
    result = CliRunner().invoke(
        main,
        [
            "--data-dir",
            str(data_dir),
            "report",
            str(session),
            "--csv",
            str(out / "s.csv"),
            "--fhir",
            str(out / "s.fhir.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "450 samples written" in result.output
    fhir = json.loads((out / "s.fhir.json").read_text())
    fhir.pop("timestamp", None)
    fhir.pop("id", None)
    return (out / "s.csv").read_text(), fhir


def test_an_old_store_opens_migrated_and_reads_raw_then_compacted(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    session, samples = old_store(data_dir)
    path = data_dir / SESSIONS_FILENAME
    with SessionStore(path) as store:
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (len(_MIGRATIONS),)
        assert {row[2] for row in chunk_rows(path)} == {0}  # still raw
        sequences, stored = store.telemetry(session)
        assert sequences.tolist() == list(range(450))
        assert stored.tobytes() == samples.tobytes()
        report = load_report(store, session, default_policy())
        assert write_csv(report, tmp_path / "direct.csv") == 450
    raw_csv, raw_fhir = exports(data_dir, session, tmp_path / "raw")

    with SessionStore(path) as store:
        assert store.compact_telemetry(session) == 1
    assert chunk_rows(path) == [(0, 450, 1)]
    packed_csv, packed_fhir = exports(data_dir, session, tmp_path / "packed")
    assert packed_csv == raw_csv == (tmp_path / "direct.csv").read_text()
    assert packed_fhir == raw_fhir
