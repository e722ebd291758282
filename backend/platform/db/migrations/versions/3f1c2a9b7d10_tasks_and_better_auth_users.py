"""tasks, and Better Auth's users table when Better Auth has not made it yet

The schema as the service created it at start-up before it had migrations, exactly, so that a
database made then and one made by this revision are the same (start-up adopts the former by
stamping it at this revision, without running it):

- Better Auth's users table (AUTH_USER_TABLE, default "user"), only if missing: Better Auth's
  own migration may have made it, with columns of its plugins too, and it stays Better Auth's.
  Made here with exactly Better Auth's columns, so that the service runs before Better Auth's
  migration has, which then finds the table as its own.
- tasks, each owned by a user: deleting the user deletes their tasks (ON DELETE CASCADE).
- ix_tasks_user_id_created_at, which serves "this user's tasks, newest first" (the list
  operation's order) and every lookup by user_id.

Revision ID: 3f1c2a9b7d10
Revises:
Create Date: 2026-12-02 01:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "3f1c2a9b7d10"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    users = context.config.attributes["auth_user_table"]
    op.create_table(
        users,
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False, unique=True),
        sa.Column("emailVerified", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("image", sa.Text(), nullable=True),
        sa.Column(
            "createdAt",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("CURRENT_TIMESTAMP"),
        ),
        sa.Column(
            "updatedAt",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("CURRENT_TIMESTAMP"),
        ),
        if_not_exists=True,
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "user_id",
            sa.Text(),
            sa.ForeignKey(f"{users}.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("completed", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
    )
    op.create_index(
        "ix_tasks_user_id_created_at",
        "tasks",
        ["user_id", sa.text("created_at DESC"), sa.text("id DESC")],
    )


def downgrade() -> None:
    # The users table is Better Auth's (this revision may not have made it): left in place.
    op.drop_index("ix_tasks_user_id_created_at", table_name="tasks")
    op.drop_table("tasks")
