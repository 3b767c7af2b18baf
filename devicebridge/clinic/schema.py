"""The console's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Alembic migrations (``devicebridge/clinic/migrations``) create and change them;
``tests/clinic/test_store.py`` checks that the migrated database matches these
definitions. What a bridge publishes is kept as the bridge said it (its ids, its
times); every row a message produces carries that message's sequence number
(the ``n`` of ``<bridge_id>:<n>``) so that a message seen twice changes nothing.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

NAMING: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

ID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite's rowid alias must be INTEGER


def _time(name: str, *, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


users = Table(
    "users",
    metadata,
    Column("id", ID, primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    # The signing key this therapist uses (a file in the console's key directory).
    Column("therapist_id", String(64), nullable=True),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("disabled", Boolean, nullable=False, default=False),
    _time("created_at", nullable=False),
)

web_sessions = Table(
    "web_sessions",
    metadata,
    # SHA-256 of the cookie's random token: a copy of the table logs nobody in.
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("csrf_token", String(64), nullable=False),
    _time("created_at", nullable=False),
    _time("expires_at", nullable=False),
)

clients = Table(
    "clients",
    metadata,
    Column("id", ID, primary_key=True),
    Column("bridge_id", String(128), nullable=False, unique=True),
    Column("label", String(128), nullable=True),  # a pseudonym the clinic chooses
    Column("availability", String(16), nullable=True),  # online / offline (retained)
    _time("availability_at"),
    Column("version", String(32), nullable=True),
    Column("bridge_state", String(16), nullable=True),  # running / stopped
    Column("outbox_depth", Integer, nullable=True),
    Column("status_seq", BigInteger, nullable=False, default=0),
    _time("status_at"),
    Column("adherence_seq", BigInteger, nullable=False, default=0),
    _time("last_seen_at"),
    _time("created_at", nullable=False),
)

assignments = Table(
    "assignments",
    metadata,
    Column("user_id", ID, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("client_id", ID, ForeignKey("clients.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_assignments_client_id", "client_id"),
)

devices = Table(
    "devices",
    metadata,
    Column("id", ID, primary_key=True),
    Column("client_id", ID, ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
    Column("serial", String(64), nullable=False),
    Column("name", String(128), nullable=True),
    Column("kind", String(16), nullable=True),
    Column("model", String(64), nullable=True),
    Column("firmware", String(64), nullable=True),
    Column("state", String(32), nullable=True),
    Column("battery_percent", Integer, nullable=True),
    Column("session_id", BigInteger, nullable=True),  # the bridge's running session
    Column("seq", BigInteger, nullable=False, default=0),
    _time("updated_at"),
    UniqueConstraint("client_id", "serial"),
)

programs = Table(
    "programs",
    metadata,
    Column("id", ID, primary_key=True),
    Column("client_id", ID, ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
    Column("bridge_program_id", BigInteger, nullable=False),
    Column("therapist_id", String(64), nullable=True),
    Column("key_id", String(32), nullable=True),
    Column("program_version", String(32), nullable=True),
    Column("routine", String(200), nullable=True),
    Column("device_kind", String(16), nullable=True),
    _time("received_at"),
    _time("expires_at"),
    Column("installed_on", Text, nullable=False, default="[]"),  # JSON list of serials
    Column("pending_on", Text, nullable=False, default="[]"),
    Column("seq", BigInteger, nullable=False, default=0),
    UniqueConstraint("client_id", "bridge_program_id"),
)

pushes = Table(
    "pushes",
    metadata,
    Column("id", ID, primary_key=True),
    Column("client_id", ID, ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
    Column("nonce", String(64), nullable=False, unique=True),
    Column("batch", String(32), nullable=True),  # pushes made together from the console
    Column("pushed_by", ID, ForeignKey("users.id", ondelete="SET NULL"), nullable=True),
    Column("therapist_id", String(64), nullable=True),
    Column("routine", String(200), nullable=True),
    Column("category", String(64), nullable=True),
    Column("program_version", String(32), nullable=True),
    Column("schedule_max_sessions", Integer, nullable=True),
    Column("schedule_per_days", Float, nullable=True),
    Column("program_text", Text, nullable=True),
    Column("envelope", Text, nullable=True),  # the signed envelope while it waits to be sent
    # queued (not yet at the broker), sent, accepted, rejected
    Column("status", String(16), nullable=False),
    Column("reason", String(32), nullable=True),
    Column("detail", Text, nullable=True),
    Column("bridge_program_id", BigInteger, nullable=True),
    _time("created_at", nullable=False),
    _time("sent_at"),
    _time("acked_at"),
    _time("expires_at"),
    Index("ix_pushes_client_id_bridge_program_id", "client_id", "bridge_program_id"),
    Index("ix_pushes_status", "status"),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", ID, primary_key=True),
    Column("client_id", ID, ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
    Column("bridge_session_id", BigInteger, nullable=False),
    Column("serial", String(64), nullable=True),
    # running (seen started, no summary yet), completed, stopped, interrupted, refused
    Column("status", String(16), nullable=False),
    Column("end_reason", Text, nullable=True),
    Column("bridge_program_id", BigInteger, nullable=True),
    Column("routine", String(200), nullable=True),
    _time("started_at"),
    _time("ended_at"),
    Column("completion", Float, nullable=True),
    Column("cap_events", Integer, nullable=True),
    Column("summary", Text, nullable=True),  # the bridge's summary, JSON
    Column("seq", BigInteger, nullable=False, default=0),
    UniqueConstraint("client_id", "bridge_session_id"),
    Index("ix_sessions_client_id_started_at", "client_id", "started_at"),
)

# One row per telemetry message and zone: enough to plot a session and to give contact
# time and pressure per zone, at about a hundredth of the raw samples' size.
session_series = Table(
    "session_series",
    metadata,
    Column("session_id", ID, ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True),
    Column("first_sequence", BigInteger, primary_key=True),
    Column("zone", String(32), primary_key=True),  # a massage zone, "none", or "face" (mask)
    Column("device_time_ms", BigInteger, nullable=False),
    Column("samples", Integer, nullable=False),
    Column("sample_rate_hz", Float, nullable=False),
    Column("contact_samples", Integer, nullable=False),
    Column("pressure_mean_kpa", Float, nullable=True),
    Column("pressure_min_kpa", Float, nullable=True),
    Column("pressure_max_kpa", Float, nullable=True),
    Column("skin_temperature_max_c", Float, nullable=True),
    Column("red_mw_cm2", Float, nullable=True),
    Column("near_infrared_mw_cm2", Float, nullable=True),
    Column("blue_mw_cm2", Float, nullable=True),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", ID, primary_key=True),
    Column("client_id", ID, ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
    # safety_stop, over_cap, refused_start, device_fault, program_rejected
    Column("kind", String(32), nullable=False),
    # What raised it, once: "session:<bridge session id>" or "message:<sequence>".
    Column("ref", String(64), nullable=False),
    Column("serial", String(64), nullable=True),
    Column("bridge_session_id", BigInteger, nullable=True),
    Column("message", Text, nullable=False),
    Column("rule", Text, nullable=True),
    _time("raised_at", nullable=False),
    Column("acknowledged_by", ID, ForeignKey("users.id", ondelete="SET NULL"), nullable=True),
    _time("acknowledged_at"),
    UniqueConstraint("client_id", "kind", "ref"),
    Index("ix_alerts_client_id_acknowledged_at", "client_id", "acknowledged_at"),
)

settings = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
