"""Drive the app in-process, without sockets or a load tool, to compare the cost of a request.

    DATABASE_URL=postgresql://... BETTER_AUTH_SECRET=... \\
        .venv/bin/python bench/inprocess.py get --requests 3000 --concurrency 32

It builds the app from the checkout it stands in, runs its start-up, seeds one user with 20
tasks, sends `--requests` requests of one operation (list, get, toggle or update) straight to
the ASGI app, `--concurrency` at a time, and prints requests per second and the process's CPU
time per request; then it deletes its user and tasks. The database must exist; the app creates
its tables.

CPU time on a shared machine is noisy (run-to-run spread of 20% was seen here). For a
repeatable figure, count instructions with valgrind, which does not depend on what else runs,
and take the difference of a short and a long run, so that start-up drops out:

    for n in 50 1050; do PYTHONHASHSEED=0 valgrind --tool=callgrind \
        --callgrind-out-file=/dev/null .venv/bin/python bench/inprocess.py get \
        --requests $n --warm-up 20 2>&1 | grep Collected
    done

Instructions per request = (second total - first total) / 1000. Start-up alone is about 3.3
billion instructions and varies by some tens of millions from run to run (hash seeds, the
database), so a difference over only 200 requests is good to a few percent, not better: fix
the hash seed and use a thousand requests or more before believing a change of a few percent.
"""

import argparse
import asyncio
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import uvloop
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.main import create_app  # noqa: E402
from backend.platform.db import build_engine  # noqa: E402

UPDATE_BODY = b'{"title": "renamed", "description": "in process", "completed": false}'


def main() -> None:
    args = parse_args()
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    app = create_app()
    uvloop.run(drive(app, args))  # the loop uvicorn serves on


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("operation", choices=["list", "get", "toggle", "update"])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warm-up", type=int, default=200, help="requests before measuring")
    return parser.parse_args()


async def drive(app: Any, args: argparse.Namespace) -> None:
    async with app.router.lifespan_context(app):
        # Not the app's engine: its connections are all held by the app's sessions.
        engine = build_engine(app.state.settings)
        user_id = f"inprocess-{uuid.uuid4().hex[:12]}"
        with engine.begin() as connection:
            connection.execute(
                text('INSERT INTO "user" (id, name, email) VALUES (:id, :id, :id)'),
                {"id": user_id},
            )
            first = (
                connection.execute(
                    text(
                        "INSERT INTO tasks (user_id, title, description) "
                        "SELECT :id, 'task ' || g, 'words' FROM generate_series(1, 20) g "
                        "RETURNING id"
                    ),
                    {"id": user_id},
                )
                .scalars()
                .first()
            )
        try:
            token = jwt.encode(
                {"sub": user_id, "exp": int(time.time()) + 3600},
                app.state.settings.BETTER_AUTH_SECRET,
                algorithm="HS256",
            )
            send_one = request_sender(app, args.operation, user_id, first, token)
            for _ in range(args.warm_up):
                await send_one()
            limit = asyncio.Semaphore(args.concurrency)

            async def limited() -> None:
                async with limit:
                    await send_one()

            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            await asyncio.gather(*(limited() for _ in range(args.requests)))
            elapsed, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            print(
                f"{args.operation}: {args.requests / elapsed:.0f} req/s, "
                f"{cpu / args.requests * 1e6:.0f} us CPU per request"
            )
        finally:
            with engine.begin() as connection:
                connection.execute(text('DELETE FROM "user" WHERE id = :id'), {"id": user_id})
            engine.dispose()


def request_sender(app: Any, operation: str, user_id: str, task_id: int, token: str) -> Any:
    method, path, body = {
        "list": ("GET", f"/api/{user_id}/tasks", b""),
        "get": ("GET", f"/api/{user_id}/tasks/{task_id}", b""),
        "toggle": ("PATCH", f"/api/{user_id}/tasks/{task_id}/complete", b""),
        "update": ("PUT", f"/api/{user_id}/tasks/{task_id}", UPDATE_BODY),
    }[operation]
    headers = [
        (b"host", b"bench"),
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]

    async def send_one() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError("unreachable")

        statuses = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        if statuses != [200]:
            raise SystemExit(f"{method} {path} answered {statuses}")

    return send_one


if __name__ == "__main__":
    main()
