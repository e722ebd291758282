"""Better Auth's users table: the service reads it (through the tasks FK) and never writes it.

It is created only when missing, with exactly Better Auth's columns, so that a standalone run
(no Better Auth migration yet) works and a later `npx @better-auth/cli migrate` finds it as its own.
"""

from datetime import datetime

from sqlalchemy import Boolean, Column, DateTime, Text
from sqlmodel import Field, SQLModel

from backend.platform.db import quote_identifier


def users_table_ddl(table: str) -> str:
    return f"""CREATE TABLE IF NOT EXISTS {quote_identifier(table)} (
        id text PRIMARY KEY,
        name text NOT NULL,
        email text NOT NULL UNIQUE,
        "emailVerified" boolean NOT NULL DEFAULT false,
        image text,
        "createdAt" timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
        "updatedAt" timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP
    )"""


class BetterAuthUser(SQLModel, table=True):
    """Maps the default `"user"` table, for test factories and the dev server's demo user."""

    __tablename__ = "user"

    id: str = Field(sa_column=Column(Text, primary_key=True))
    name: str = Field(sa_column=Column(Text, nullable=False))
    email: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    emailVerified: bool = Field(  # noqa: N815 - Better Auth's column name
        default=False, sa_column=Column("emailVerified", Boolean, nullable=False)
    )
    image: str | None = Field(default=None, sa_column=Column(Text))
    createdAt: datetime = Field(  # noqa: N815
        sa_column=Column("createdAt", DateTime(timezone=True), nullable=False)
    )
    updatedAt: datetime = Field(  # noqa: N815
        sa_column=Column("updatedAt", DateTime(timezone=True), nullable=False)
    )
