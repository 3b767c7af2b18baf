"""The first schema: clients, devices, programs, pushes, sessions, series, alerts, users.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite's rowid alias is INTEGER


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("id", ID, nullable=False),
        sa.Column("bridge_id", sa.String(length=128), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=True),
        sa.Column("availability", sa.String(length=16), nullable=True),
        sa.Column("availability_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.String(length=32), nullable=True),
        sa.Column("bridge_state", sa.String(length=16), nullable=True),
        sa.Column("outbox_depth", sa.Integer(), nullable=True),
        sa.Column("status_seq", sa.BigInteger(), nullable=False),
        sa.Column("status_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("adherence_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clients")),
        sa.UniqueConstraint("bridge_id", name=op.f("uq_clients_bridge_id")),
    )
    op.create_table(
        "settings",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_settings")),
    )
    op.create_table(
        "users",
        sa.Column("id", ID, nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("therapist_id", sa.String(length=64), nullable=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "alerts",
        sa.Column("id", ID, nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("ref", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=True),
        sa.Column("bridge_session_id", sa.BigInteger(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("rule", sa.Text(), nullable=True),
        sa.Column("raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_by", ID, nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["acknowledged_by"],
            ["users.id"],
            name=op.f("fk_alerts_acknowledged_by_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_alerts_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("client_id", "kind", "ref", name=op.f("uq_alerts_client_id_kind_ref")),
    )
    op.create_index(
        "ix_alerts_client_id_acknowledged_at",
        "alerts",
        ["client_id", "acknowledged_at"],
        unique=False,
    )
    op.create_table(
        "assignments",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_assignments_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_assignments_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "client_id", name=op.f("pk_assignments")),
    )
    op.create_index("ix_assignments_client_id", "assignments", ["client_id"], unique=False)
    op.create_table(
        "devices",
        sa.Column("id", ID, nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=True),
        sa.Column("model", sa.String(length=64), nullable=True),
        sa.Column("firmware", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=True),
        sa.Column("battery_percent", sa.Integer(), nullable=True),
        sa.Column("session_id", sa.BigInteger(), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_devices_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("client_id", "serial", name=op.f("uq_devices_client_id_serial")),
    )
    op.create_table(
        "programs",
        sa.Column("id", ID, nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("bridge_program_id", sa.BigInteger(), nullable=False),
        sa.Column("therapist_id", sa.String(length=64), nullable=True),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("program_version", sa.String(length=32), nullable=True),
        sa.Column("routine", sa.String(length=200), nullable=True),
        sa.Column("device_kind", sa.String(length=16), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("installed_on", sa.Text(), nullable=False),
        sa.Column("pending_on", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_programs_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_programs")),
        sa.UniqueConstraint(
            "client_id", "bridge_program_id", name=op.f("uq_programs_client_id_bridge_program_id")
        ),
    )
    op.create_table(
        "pushes",
        sa.Column("id", ID, nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("batch", sa.String(length=32), nullable=True),
        sa.Column("pushed_by", ID, nullable=True),
        sa.Column("therapist_id", sa.String(length=64), nullable=True),
        sa.Column("routine", sa.String(length=200), nullable=True),
        sa.Column("category", sa.String(length=64), nullable=True),
        sa.Column("program_version", sa.String(length=32), nullable=True),
        sa.Column("schedule_max_sessions", sa.Integer(), nullable=True),
        sa.Column("schedule_per_days", sa.Float(), nullable=True),
        sa.Column("program_text", sa.Text(), nullable=True),
        sa.Column("envelope", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("bridge_program_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_pushes_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["pushed_by"], ["users.id"], name=op.f("fk_pushes_pushed_by_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pushes")),
        sa.UniqueConstraint("nonce", name=op.f("uq_pushes_nonce")),
    )
    op.create_index(
        "ix_pushes_client_id_bridge_program_id",
        "pushes",
        ["client_id", "bridge_program_id"],
        unique=False,
    )
    op.create_index("ix_pushes_status", "pushes", ["status"], unique=False)
    op.create_table(
        "sessions",
        sa.Column("id", ID, nullable=False),
        sa.Column("client_id", ID, nullable=False),
        sa.Column("bridge_session_id", sa.BigInteger(), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("bridge_program_id", sa.BigInteger(), nullable=True),
        sa.Column("routine", sa.String(length=200), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completion", sa.Float(), nullable=True),
        sa.Column("cap_events", sa.Integer(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_sessions_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
        sa.UniqueConstraint(
            "client_id", "bridge_session_id", name=op.f("uq_sessions_client_id_bridge_session_id")
        ),
    )
    op.create_index(
        "ix_sessions_client_id_started_at", "sessions", ["client_id", "started_at"], unique=False
    )
    op.create_table(
        "web_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_web_sessions_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_web_sessions")),
    )
    op.create_table(
        "session_series",
        sa.Column("session_id", ID, nullable=False),
        sa.Column("first_sequence", sa.BigInteger(), nullable=False),
        sa.Column("zone", sa.String(length=32), nullable=False),
        sa.Column("device_time_ms", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("sample_rate_hz", sa.Float(), nullable=False),
        sa.Column("contact_samples", sa.Integer(), nullable=False),
        sa.Column("pressure_mean_kpa", sa.Float(), nullable=True),
        sa.Column("pressure_min_kpa", sa.Float(), nullable=True),
        sa.Column("pressure_max_kpa", sa.Float(), nullable=True),
        sa.Column("skin_temperature_max_c", sa.Float(), nullable=True),
        sa.Column("red_mw_cm2", sa.Float(), nullable=True),
        sa.Column("near_infrared_mw_cm2", sa.Float(), nullable=True),
        sa.Column("blue_mw_cm2", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_session_series_session_id_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "session_id", "first_sequence", "zone", name=op.f("pk_session_series")
        ),
    )


def downgrade() -> None:
    op.drop_table("session_series")
    op.drop_table("web_sessions")
    op.drop_index("ix_sessions_client_id_started_at", table_name="sessions")
    op.drop_table("sessions")
    op.drop_index("ix_pushes_status", table_name="pushes")
    op.drop_index("ix_pushes_client_id_bridge_program_id", table_name="pushes")
    op.drop_table("pushes")
    op.drop_table("programs")
    op.drop_table("devices")
    op.drop_index("ix_assignments_client_id", table_name="assignments")
    op.drop_table("assignments")
    op.drop_index("ix_alerts_client_id_acknowledged_at", table_name="alerts")
    op.drop_table("alerts")
    op.drop_table("users")
    op.drop_table("settings")
    op.drop_table("clients")
