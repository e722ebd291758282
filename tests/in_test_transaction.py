"""Serve an app's requests inside a test's session, so that what they write is rolled back."""

from fastapi import FastAPI
from sqlmodel import Session

from backend.platform.db import Database


def serve_in_session(app: FastAPI, session: Session) -> None:
    """Every request of `app` runs its handler in `session` (one request at a time), until
    `stop_serving_in_session(app)`."""
    if not hasattr(app.state, "database_outside_tests"):
        app.state.database_outside_tests = app.state.database
    app.state.database = Database.for_session(session)


def stop_serving_in_session(app: FastAPI) -> None:
    if hasattr(app.state, "database_outside_tests"):
        app.state.database = app.state.database_outside_tests
        del app.state.database_outside_tests
