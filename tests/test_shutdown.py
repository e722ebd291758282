"""Graceful shutdown of a real uvicorn process: SIGTERM while requests are in flight.

The requests are held inside the database on row locks the test owns, so they are certainly
in flight when the signal arrives; the locks are released after it. Every request must then
finish with its 2xx, the write must be stored, the pool must be closed by the lifespan, and
the process must exit cleanly.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy import Engine, text

from tests.live_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "shutdown-test-secret-0123456789-abcdefghij"


def _lock_waiters(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def test_sigterm_lets_in_flight_requests_finish_and_closes_the_pool(
    database_url: str, committed_user: str, make_token: Callable[..., str], engine: Engine
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BETTER_AUTH_SECRET": SECRET,
        "LOG_FORMAT": "json",
        # Held requests must outlast a slow start on a busy machine, not time out first.
        "DB_STATEMENT_TIMEOUT_MS": "30000",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "backend", "--port", str(port)]
        + ["--timeout-graceful-shutdown", "20"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/api/{committed_user}/tasks"
    headers = {"Authorization": f"Bearer {make_token(committed_user, secret=SECRET)}"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        task_id = httpx.post(base, json={"title": "toggled"}, headers=headers).json()["id"]

        results: list[httpx.Response] = []
        lock = threading.Lock()

        def send(method: str, url: str, body: dict[str, str] | None) -> None:
            response = httpx.request(method, url, json=body, headers=headers, timeout=30)
            with lock:
                results.append(response)

        with engine.connect() as blocker, blocker.begin():
            # Toggles wait on the task row; creates on the user row (the foreign-key check).
            blocker.execute(text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": task_id})
            blocker.execute(
                text('SELECT 1 FROM "user" WHERE id = :id FOR UPDATE'), {"id": committed_user}
            )
            requests = [("PATCH", f"{base}/{task_id}/complete", None)] * 3 + [
                ("POST", base, {"title": f"in flight {i}"}) for i in range(3)
            ]
            senders = [threading.Thread(target=send, args=request) for request in requests]
            for thread in senders:
                thread.start()
            deadline = time.monotonic() + 30
            while _lock_waiters(engine) < len(requests):
                assert time.monotonic() < deadline, "the requests never reached the locks"
                time.sleep(0.02)

            process.send_signal(signal.SIGTERM)
            # uvicorn stops listening at once; the held requests are still in flight.
            deadline = time.monotonic() + 10
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                except httpx.TransportError:
                    break
                assert time.monotonic() < deadline, "still accepting requests after SIGTERM"
                time.sleep(0.05)
            assert process.poll() is None
        # The locks are released: the requests complete, then the process exits.
        for thread in senders:
            thread.join(timeout=20)
        exit_code = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate(timeout=20)[0].decode()

    # uvicorn re-raises the signal once it has shut down cleanly, so the exit is by SIGTERM.
    assert exit_code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete." in output
    assert sorted(r.status_code for r in results) == [200, 200, 200, 201, 201, 201], output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    events = [line.get("event") for line in lines]
    assert "db.pool_closed" in events
    # The pool closed after the last request, with nothing checked out.
    last_request = max(i for i, line in enumerate(lines) if line.get("event") == "request")
    closed = events.index("db.pool_closed")
    assert closed > last_request
    assert "Current Checked out connections: 0" in lines[closed]["pool"]
    assert "Traceback" not in output

    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT title, completed FROM tasks WHERE user_id = :u ORDER BY id"),
            {"u": committed_user},
        ).all()
    told = {r.json()["title"] for r in results if r.status_code == 201}
    assert {row.title for row in rows} == {"toggled"} | told
    assert next(row.completed for row in rows if row.title == "toggled") is True  # three flips
