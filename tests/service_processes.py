"""Throwaway databases and the service as real processes (`python -m backend`), for start-up
tests."""

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
SECRET = "startup-test-secret-0123456789-abcdefghij"


@contextmanager
def empty_database(server_url: str, *, prefix: str = "todo_empty") -> Iterator[str]:
    """The URL of a new, empty database on `server_url`'s server, dropped afterwards."""
    server = make_url(server_url.replace("postgres://", "postgresql://", 1))
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        server.set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def service_env(database_url: str, **settings: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": SECRET,
        "LOG_FORMAT": "json",
        **settings,
    }


def start_uvicorn(
    env: dict[str, str], port: int, *options: str, output: IO[bytes] | None = None
) -> subprocess.Popen[str]:
    """`python -m backend` (uvicorn, our protocol) on `port`, as an operator runs it; output
    collected (or written to `output`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "backend", "--port", str(port), *options],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE if output is None else output,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_healthy(process: subprocess.Popen[str], port: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"the service exited {process.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"no healthy answer on port {port} in {timeout} s"
        time.sleep(0.1)


def stop(process: subprocess.Popen[str]) -> str:
    """Stop the process (SIGTERM, then SIGKILL) and return everything it printed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    output, _ = process.communicate()
    return output


def alembic(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    """The `alembic` command line from the repository's root, as the README tells operators."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("alembic")), *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
