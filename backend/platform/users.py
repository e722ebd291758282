"""Better Auth's users table: the service reads it (through the tasks FK) and never writes it.

The first migration creates it only when missing, with exactly Better Auth's columns, so that a
standalone run (no Better Auth migration yet) works and a later `npx @better-auth/cli migrate`
finds it as its own.
"""

from datetime import datetime

from sqlalchemy import Boolean, Column, DateTime, Text, text
from sqlmodel import Field, SQLModel


class BetterAuthUser(SQLModel, table=True):
    """Maps the default `"user"` table: what the first migration creates when it is missing
    (autogenerate compares against it), and rows for test factories and the dev demo user."""

    __tablename__ = "user"

    id: str = Field(sa_column=Column(Text, primary_key=True))
    name: str = Field(sa_column=Column(Text, nullable=False))
    email: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    emailVerified: bool = Field(  # noqa: N815 - Better Auth's column name
        default=False,
        sa_column=Column("emailVerified", Boolean, nullable=False, server_default=text("false")),
    )
    image: str | None = Field(default=None, sa_column=Column(Text))
    createdAt: datetime = Field(  # noqa: N815
        sa_column=Column(
            "createdAt",
            DateTime(timezone=True),
            nullable=False,
            server_default=text("CURRENT_TIMESTAMP"),
        )
    )
    updatedAt: datetime = Field(  # noqa: N815
        sa_column=Column(
            "updatedAt",
            DateTime(timezone=True),
            nullable=False,
            server_default=text("CURRENT_TIMESTAMP"),
        )
    )
