"""Serve an app's requests inside a test's session, so that what they write is rolled back."""

from fastapi import FastAPI
from sqlmodel import Session

from backend.platform.db import Database, get_database


def serve_in_session(app: FastAPI, session: Session) -> None:
    """Every request of `app` runs its handler in `session` (one request at a time), until
    `stop_serving_in_session(app)`."""
    database = Database.for_session(session)

    async def database_in_test_transaction() -> Database:
        return database

    app.dependency_overrides[get_database] = database_in_test_transaction


def stop_serving_in_session(app: FastAPI) -> None:
    app.dependency_overrides.pop(get_database, None)
