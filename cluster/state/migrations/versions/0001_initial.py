"""The initial schema: users, tokens, evaluations, shards, incidents.

Revision ID: 0001
Revises:
Created: 2025-01-01

Self-contained on purpose: a migration describes the schema as it was at its revision,
so it never imports the current models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        _ts("created_at", nullable=False),
        sa.UniqueConstraint("name", name="uq_users_name"),
        sa.CheckConstraint("role IN ('viewer', 'researcher', 'safety', 'admin')", name="ck_users_role"),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        _ts("created_at", nullable=False),
        _ts("expires_at"),
        _ts("revoked_at"),
        _ts("last_used_at"),
        sa.UniqueConstraint("hash", name="uq_tokens_hash"),
    )
    op.create_index("ix_tokens_user_id", "tokens", ["user_id"])
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("total_shards", sa.Integer, nullable=False),
        sa.Column("total_units", sa.Integer, nullable=False),
        sa.Column("done_units", sa.Integer, nullable=False, server_default="0"),
        sa.Column("wait_reason", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("summary", JSON),
        sa.Column("results_uri", sa.Text),
        _ts("created_at", nullable=False),
        _ts("scheduled_at"),
        _ts("started_at"),
        _ts("finished_at"),
        _ts("updated_at", nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_index("ix_evaluations_created", "evaluations", ["created_at", "id"])
    op.create_index("ix_evaluations_owner_created", "evaluations", ["owner", "created_at"])
    op.create_index("ix_evaluations_status", "evaluations", ["status"])
    op.create_table(
        "shards",
        sa.Column("eval_id", sa.String(64), sa.ForeignKey("evaluations.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("shard_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("sample_ids", JSON, nullable=False),
        sa.Column("units", sa.Integer, nullable=False),
        sa.Column("resources", JSON, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
        sa.Column("sandbox_id", sa.String(128)),
        sa.Column("supervisor", sa.String(128)),
        sa.Column("placement", sa.String(128)),
        sa.Column("error", sa.Text),
        _ts("created_at", nullable=False),
        _ts("started_at"),
        _ts("finished_at"),
        _ts("updated_at", nullable=False),
    )
    op.create_index("ix_shards_status", "shards", ["status"])
    op.create_table(
        "incidents",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("eval_id", sa.String(64), sa.ForeignKey("evaluations.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("shard_id", sa.String(64)),
        sa.Column("rule", sa.String(128), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("evidence", JSON, nullable=False),
        _ts("created_at", nullable=False),
    )
    op.create_index("ix_incidents_eval_created", "incidents", ["eval_id", "created_at"])
    op.create_index("ix_incidents_created_at", "incidents", ["created_at"])


def downgrade() -> None:
    for table in ("incidents", "shards", "evaluations", "tokens", "users"):
        op.drop_table(table)
