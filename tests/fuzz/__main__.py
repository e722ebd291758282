"""Fuzz the API as it runs: a real uvicorn on a throwaway database, a real user and token,
schemathesis generating requests for every operation from the live `/openapi.json`.

Fails on any 5xx, any response that does not match its documented schema, status code,
content type or headers, a valid request refused or an invalid one accepted, auth that is
ignored, and on any error the server logged. `./scripts/fuzz.sh [schemathesis options]`;
FUZZ_MAX_TIME (seconds, default 120) bounds the run.

The database: a throwaway one on the server in TEST_DATABASE_URL when set, else on the
embedded PostgreSQL in `.pgdata/fuzz`; dropped at the end either way.
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import jwt
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from tests.live_server import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")
USER_ID = "fuzz-user"


def _server_url() -> URL:
    raw = os.environ.get("TEST_DATABASE_URL")
    if not raw:
        import pgserver  # noqa: PLC0415 - only without TEST_DATABASE_URL

        data = ROOT / ".pgdata" / "fuzz"
        data.parent.mkdir(exist_ok=True)
        raw = str(pgserver.get_server(data, cleanup_mode="stop").get_uri())
    return make_url(raw.replace("postgres://", "postgresql://", 1)).set(
        drivername="postgresql+psycopg2"
    )


def _wait_until_healthy(base: str, server: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become healthy in time")


def _logged_errors(log_path: Path) -> list[str]:
    """Lines the server logged at error level or above (a 500, an unexpected database error)."""
    problems = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(line)  # anything not a JSON log line (a raw traceback) is a problem
            continue
        if entry.get("level") in ("error", "critical") or entry.get("status", 0) >= 500:
            problems.append(line)
    return problems


def main(argv: list[str]) -> int:
    server_url = _server_url()
    name = f"todo_fuzz_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    database_url = server_url.set(database=name)
    secret = secrets.token_urlsafe(48)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    log_path = workdir / "server.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url.render_as_string(hide_password=False),
        "BETTER_AUTH_SECRET": secret,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
    }
    with log_path.open("wb") as log:
        server = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "backend", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_healthy(base, server)
        engine = create_engine(database_url)
        with engine.begin() as connection:
            connection.execute(
                text('INSERT INTO "user" (id, name, email) VALUES (:id, :id, :email)'),
                {"id": USER_ID, "email": f"{USER_ID}@example.com"},
            )
        engine.dispose()
        now = int(time.time())
        token = jwt.encode({"sub": USER_ID, "iat": now, "exp": now + 3600}, secret, "HS256")
        command = [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(CONFIG),
            "run",
            f"{base}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--max-time",
            os.environ.get("FUZZ_MAX_TIME", "120"),
            *argv,
        ]
        env_run = {
            **os.environ,
            "FUZZ_USER_ID": USER_ID,
            "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        result = subprocess.run(command, cwd=workdir, env=env_run, check=False)  # noqa: S603
        errors = _logged_errors(log_path)
        if errors:
            print(
                f"\nThe server logged {len(errors)} error(s) during the run:",
                *errors[:20],
                sep="\n",
            )
        return result.returncode or (1 if errors else 0)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
