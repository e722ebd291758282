"""Development server: the API on an embedded PostgreSQL, a dev secret and a demo user.

`python -m backend.dev` (what `./scripts/dev.sh` runs). Data lives in `.pgdata/dev` across
restarts (DEV_DATA_DIR moves `.pgdata`). Set DATABASE_URL to use your own PostgreSQL instead of
the embedded one. Stopping it (Ctrl-C, SIGTERM) stops the embedded PostgreSQL cleanly too.
"""

import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import jwt
import uvicorn
from sqlalchemy import text

from backend.platform.processes import process_is_running

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("DEV_DATA_DIR") or ROOT / ".pgdata")
DEMO_USER = "demo-user"


def _dev_secret() -> str:
    """A random secret made once per checkout, so dev tokens are never valid anywhere else."""
    path = DATA / "dev-secret"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def _stop_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def _start_embedded_postgres() -> Any:
    import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    pgdata = DATA / "dev"
    # pgserver stops the server when the last process that started it lets go, by the list of
    # process ids it keeps in the data directory. A process that died without letting go (a
    # kill -9) stays listed and would keep the server running forever: only live ones are kept.
    handles = pgdata / ".handle_pids.json"
    if handles.exists():
        live = [pid for pid in json.loads(handles.read_text() or "[]") if process_is_running(pid)]
        handles.write_text(json.dumps(live))
    return pgserver.get_server(pgdata, cleanup_mode="stop")


def main() -> None:
    # uvicorn turns SIGTERM and SIGINT into a graceful shutdown while it serves, then raises the
    # signal again once done. Python's default for SIGTERM ends the process on the spot, which
    # would skip the `finally` below and leave the embedded PostgreSQL running; as SystemExit it
    # unwinds like Ctrl-C's KeyboardInterrupt does.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    DATA.mkdir(parents=True, exist_ok=True)
    embedded = None
    try:
        if not os.environ.get("DATABASE_URL"):
            embedded = _start_embedded_postgres()
            os.environ["DATABASE_URL"] = embedded.get_uri()
        _serve()
    finally:
        if embedded is not None:
            embedded.cleanup()  # pg_ctl stop: a clean shutdown, ready for the next start


def _serve() -> None:
    os.environ.setdefault("BETTER_AUTH_SECRET", _dev_secret())
    os.environ.setdefault("LOG_FORMAT", "console")
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))

    from backend.main import create_app
    from backend.platform.config import get_settings
    from backend.platform.db import build_engine, quote_identifier
    from backend.platform.db.migrate import StartupRefused, prepare_schema
    from backend.platform.logging import redacted_url

    settings = get_settings()
    engine = build_engine(settings, autocommit=True)  # as the service runs in production
    try:
        prepare_schema(settings)  # before the demo user goes in; start-up then finds it at head
    except StartupRefused as exc:
        raise SystemExit(f"Refusing to start: {exc}") from None
    users = quote_identifier(settings.AUTH_USER_TABLE)
    with engine.begin() as connection:
        connection.execute(
            text(
                # The table name is a validated identifier (see Settings), quoted here.
                f"INSERT INTO {users} (id, name, email) VALUES (:id, 'Demo User', :email) "  # noqa: S608
                "ON CONFLICT (id) DO NOTHING"
            ),
            {"id": DEMO_USER, "email": "demo@example.com"},
        )
    token = jwt.encode(
        {"sub": DEMO_USER, "iat": int(time.time()), "exp": int(time.time()) + 7 * 24 * 3600},
        settings.BETTER_AUTH_SECRET,
        algorithm="HS256",
    )
    base = f"http://{host}:{port}"
    database = redacted_url(settings.DATABASE_URL)  # a password in it stays off the terminal
    print(
        f"\nTodo API on {base}  (docs: {base}/docs, database: {database})\n"
        f"Demo user {DEMO_USER!r}; its token (valid 7 days) and curl lines to paste:\n\n"
        f"  {token}\n\n"
        f"  curl -s -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' "
        f'-d \'{{"title":"Try the API"}}\' {base}/api/{DEMO_USER}/tasks\n\n'
        f"  curl -s -H 'Authorization: Bearer {token}' {base}/api/{DEMO_USER}/tasks\n",
        flush=True,
    )
    from backend.platform.server.protocol import HeaderLimitedProtocol

    uvicorn.run(
        create_app(settings, engine=engine),
        host=host,
        port=port,
        log_config=None,
        http=HeaderLimitedProtocol,  # as `python -m backend` serves in production
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass  # Ctrl-C: stopped as asked, PostgreSQL included
