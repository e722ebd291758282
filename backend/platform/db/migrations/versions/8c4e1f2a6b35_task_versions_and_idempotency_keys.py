"""tasks.version (the ETag) and idempotency_keys (retried writes answered once)

- tasks.version: a counter every write bumps; a task's strong ETag, which `If-Match` compares
  in the write's own WHERE clause. Existing tasks start at 1 (PostgreSQL 11+ adds a column with
  a constant default without rewriting the table).
- idempotency_keys: the answer to each write sent with an `Idempotency-Key`, recorded in the
  same statement as the write, replayed to a retry for 24 hours. Keyed by user, operation and
  key, so that two users' keys never meet; the primary key's name is what the service
  recognises a taken key by (`idempotency.PRIMARY_KEY_NAME`). `expires_at` is indexed for the
  service's own clean-up of expired keys.

Revision ID: 8c4e1f2a6b35
Revises: 3f1c2a9b7d10
Create Date: 2026-12-02 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "8c4e1f2a6b35"
down_revision: str | Sequence[str] | None = "3f1c2a9b7d10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tasks",
        sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("1")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("operation", sa.Text(), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("response", postgresql.JSONB(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "operation", "key", name="idempotency_keys_pkey"),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_column("tasks", "version")
