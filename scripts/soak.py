#!/usr/bin/env python
"""Soak test: a real uvicorn under mixed load for a while, then every write checked in the database.

    .venv/bin/python scripts/soak.py                      # 60 s, 64 connections (README figures)
    .venv/bin/python scripts/soak.py --duration 10        # what CI runs
    .venv/bin/python scripts/soak.py --kill-idle-every 2  # Neon-style: kill idle connections
    .venv/bin/python scripts/soak.py --keyed              # every write retried under its key

It makes a throwaway database on the PostgreSQL given by --database-url (default
$TEST_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/postgres), starts
`python -m backend` on it, and runs one client per connection, each signed in as its own
user doing creates, lists, gets, renames, toggles and deletes of its own tasks in turn. Then it
compares what the clients were told with what the database holds and prints the figures:
requests, answers by status, latency, writes acknowledged and writes found. It exits 1 when any
answer is a 5xx other than 503, when there are more 503s than a quarter of the idle connections
killed (none without kills), or when an acknowledged write is missing.

With --kill-idle-every, the service's idle connections are killed server-side (what Neon's
suspend does) that often. Those kills are meant to be invisible; only a kill landing in the
instant between a connection's checkout and its first statement can cost a request a 503.

With --keyed, each write carries a fresh Idempotency-Key and is retried with it (after a 503, a
409 or a transport failure) until it succeeds, as the TypeScript client does: then every write
must succeed, and none may take effect twice.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg2
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
WRITES = ("create", "rename", "toggle", "delete")


@dataclass
class Call:
    op: str
    task_id: int | None
    sent_title: str | None
    status: int
    body: Any
    started: float
    seconds: float
    tries: int = 1
    replayed: bool = False


@dataclass
class Client:
    user_id: str
    calls: list[Call] = field(default_factory=list)


def dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def work(
    http: httpx.AsyncClient, client: Client, token: str, deadline: float, seed: int, keyed: bool
) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    base = f"/api/{client.user_id}/tasks"
    live: list[int] = []

    async def call(op: str, method: str, url: str, task_id: int | None, body: Any = None) -> Call:
        started = time.monotonic()
        title = body.get("title") if isinstance(body, dict) else None
        sent = headers
        if keyed and op in WRITES:
            sent = {**headers, "Idempotency-Key": str(uuid.uuid4())}
        tries, replayed = 0, False
        while True:
            tries += 1
            try:
                response = await http.request(method, url, json=body, headers=sent)
                status, payload = response.status_code, response.json()
                replayed = response.headers.get("Idempotent-Replayed") == "true"
            except httpx.HTTPError as exc:  # a transport failure is a result too: status 0
                status, payload = 0, {"detail": f"{type(exc).__name__}: {exc}"}
            if sent is headers or status not in (0, 409, 503) or tries >= 20:
                break
            await asyncio.sleep(min(0.05 * 2**tries, 1.0))  # capped backoff, same key
        result = Call(
            op,
            task_id,
            title,
            status,
            payload,
            started,
            time.monotonic() - started,
            tries,
            replayed,
        )
        client.calls.append(result)
        return result

    while time.monotonic() < deadline:
        roll = rng.random()
        if not live or roll < 0.25:
            title = f"soak {uuid.uuid4().hex}"
            result = await call("create", "POST", base, None, {"title": title})
            if result.status == 201:
                live.append(result.body["id"])
            continue
        if roll < 0.45:
            status = rng.choice(["all", "pending", "completed"])
            await call("list", "GET", f"{base}?status={status}", None)
            continue
        task_id = rng.choice(live)
        if roll < 0.60:
            result = await call("get", "GET", f"{base}/{task_id}", task_id)
        elif roll < 0.75:
            title = f"soak {uuid.uuid4().hex}"
            result = await call("rename", "PATCH", f"{base}/{task_id}", task_id, {"title": title})
        elif roll < 0.90:
            result = await call("toggle", "PATCH", f"{base}/{task_id}/complete", task_id)
        else:
            result = await call("delete", "DELETE", f"{base}/{task_id}", task_id)
            if result.status == 200:
                live.remove(task_id)
                continue
        if result.status != 200:
            # After a failure the task is left alone, so the failure is its last event and
            # what it left behind (or not) can be checked.
            live.remove(task_id)
            await asyncio.sleep(0.05)


async def run_load(
    url: str, clients: list[Client], tokens: dict[str, str], seconds: float, keyed: bool
) -> None:
    limits = httpx.Limits(max_connections=len(clients), max_keepalive_connections=len(clients))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(work(http, c, tokens[c.user_id], deadline, i, keyed) for i, c in enumerate(clients))
        )


def verify(clients: list[Client], rows: dict[int, tuple[str, str, bool]]) -> dict[str, Any]:
    """Acknowledged writes against the stored rows (see the module docstring)."""
    acknowledged = found = 0
    missing: list[str] = []
    failed_left_behind = 0
    expected_ids: set[int] = set()
    stored_titles = {title: task_id for task_id, (_, title, _) in rows.items()}
    for client in clients:
        history: dict[int, list[Call]] = {}
        for call in client.calls:
            if call.op == "create" and call.status == 201:
                history.setdefault(call.body["id"], []).append(call)
            elif call.op == "create" and call.sent_title in stored_titles:
                failed_left_behind += 1  # its COMMIT reached the server; its answer did not
                expected_ids.add(stored_titles[call.sent_title])
            elif call.task_id is not None:
                history.setdefault(call.task_id, []).append(call)
        for task_id, calls in history.items():
            writes = [c for c in calls if c.op in WRITES and c.status in (200, 201)]
            acknowledged += len(writes)
            last = writes[-1]
            row = rows.get(task_id)
            if last.op == "delete":
                ok = row is None
            else:
                expected_ids.add(task_id)
                ok = row is not None and row[0] == client.user_id
                ok = ok and (row[1], row[2]) == (last.body["title"], last.body["completed"])
            later_failures = [
                c for c in calls if c.started > last.started and c.status not in (200, 201)
            ]
            if ok:
                found += len(writes)
            elif later_failures and later_failures[-1].op in WRITES:
                failed_left_behind += 1  # the failed last write took effect after all
                found += len(writes)
            else:
                missing.append(f"task {task_id}: told {last.op} {last.body}, stored {row}")
    extra = set(rows) - expected_ids
    return {
        "writes_acknowledged": acknowledged,
        "writes_found": found,
        "writes_missing": missing,
        "failed_writes_that_took_effect": failed_left_behind,
        "rows_nobody_was_told_about": len(extra),
    }


def kill_idle(admin_dsn: str, database: str, every: float, stop: threading.Event) -> list[int]:
    kills: list[int] = []
    with psycopg2.connect(admin_dsn) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            while not stop.wait(every):
                cursor.execute(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
                    "FROM pg_stat_activity WHERE datname = %s AND application_name = 'todo-api' "
                    "AND state = 'idle'",
                    (database,),
                )
                kills.append(cursor.fetchone()[0])
    return kills


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--kill-idle-every", type=float, default=0.0, help="seconds; 0 = never")
    parser.add_argument(
        "--keyed", action="store_true", help="retry every write under its Idempotency-Key"
    )
    args = parser.parse_args()

    server = make_url(args.database_url.replace("postgres://", "postgresql://", 1))
    database = f"todo_soak_{uuid.uuid4().hex[:10]}"
    admin_dsn = dsn(server.render_as_string(hide_password=False))
    service_url = server.set(database=database).render_as_string(hide_password=False)
    secret = uuid.uuid4().hex + uuid.uuid4().hex

    admin = psycopg2.connect(admin_dsn)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{database}"')
    port = free_port()
    process = None
    server_log = tempfile.TemporaryFile()  # a pipe nobody reads would block the server
    try:
        env = {**os.environ, "DATABASE_URL": service_url, "BETTER_AUTH_SECRET": secret}
        env["LOG_LEVEL"] = "WARNING"  # one line per request would measure the log, not the service
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed arguments
            [sys.executable, "-m", "backend", "--port", str(port)]
            # A starved client can leave a kept-alive connection idle past uvicorn's 5 s and
            # lose the race with its close: that measures the client, not the service.
            + ["--timeout-keep-alive", "60"],
            cwd=ROOT,
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("the service did not start")
            time.sleep(0.1)

        clients = [Client(f"soak-{i:03d}-{uuid.uuid4().hex[:6]}") for i in range(args.connections)]
        db_dsn = dsn(service_url)
        with psycopg2.connect(db_dsn) as connection, connection.cursor() as cursor:
            for client in clients:
                cursor.execute(
                    'INSERT INTO "user" (id, name, email) VALUES (%s, %s, %s)',
                    (client.user_id, client.user_id, f"{client.user_id}@example.com"),
                )
        now = int(time.time())
        tokens = {
            c.user_id: jwt.encode({"sub": c.user_id, "iat": now, "exp": now + 3600}, secret)
            for c in clients
        }

        stop = threading.Event()
        kills: list[int] = []
        killer = None
        if args.kill_idle_every > 0:
            killer = threading.Thread(
                target=lambda: kills.extend(
                    kill_idle(db_dsn, database, args.kill_idle_every, stop)
                ),
                daemon=True,
            )
            killer.start()
        started = time.monotonic()
        asyncio.run(run_load(url, clients, tokens, args.duration, args.keyed))
        elapsed = time.monotonic() - started
        stop.set()
        if killer is not None:
            killer.join(timeout=10)

        with psycopg2.connect(db_dsn) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT id, user_id, title, completed FROM tasks")
            rows = {r[0]: (r[1], r[2], r[3]) for r in cursor.fetchall()}
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()

    server_log.seek(0)
    server_errors = [
        line
        for line in server_log.read().decode(errors="replace").splitlines()
        if '"level": "error"' in line or "Traceback" in line or line.startswith("ERROR")
    ]
    calls = [call for client in clients for call in client.calls]
    by_status: dict[str, int] = {}
    for call in calls:
        by_status[str(call.status)] = by_status.get(str(call.status), 0) + 1
    latencies = sorted(call.seconds * 1000 for call in calls)
    figures: dict[str, Any] = {
        "duration_s": round(elapsed, 1),
        "connections": args.connections,
        "requests": len(calls),
        "requests_per_s": round(len(calls) / elapsed, 1),
        "by_status": dict(sorted(by_status.items())),
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p99": round(latencies[int(len(latencies) * 0.99)], 1),
            "max": round(latencies[-1], 1),
        },
        "idle_connections_killed": sum(kills),
        "keyed": args.keyed,
        "writes_retried": sum(c.tries > 1 for c in calls if c.op in WRITES),
        "writes_replayed": sum(c.replayed for c in calls),
        "transport_errors": sorted({c.body["detail"] for c in calls if c.status == 0}),
        "server_errors_logged": server_errors[:20],
        **verify(clients, rows),
    }
    print(json.dumps(figures, indent=2))

    problems = []
    bad = {s for s in by_status if s not in ("200", "201", "503")}
    if bad:
        problems.append(f"answers other than 200/201/503: {sorted(bad)}")
    unavailable = by_status.get("503", 0)
    if unavailable > figures["idle_connections_killed"] // 4:
        # Killing idle connections must be invisible; only a kill that lands between a
        # connection's checkout and its first statement may cost a request (a rare race).
        problems.append(f"{unavailable} 503s for {figures['idle_connections_killed']} idle kills")
    if figures["writes_missing"]:
        problems.append(f"{len(figures['writes_missing'])} acknowledged writes missing")
    if server_errors:
        problems.append(f"{len(server_errors)} errors in the service's log")
    if args.keyed:
        unfinished = [c for c in calls if c.op in WRITES and c.status not in (200, 201)]
        if unfinished:
            problems.append(f"{len(unfinished)} keyed writes never succeeded")
        if figures["failed_writes_that_took_effect"]:
            problems.append("keyed writes in doubt (a failure that took effect)")
    if figures["rows_nobody_was_told_about"]:
        problems.append("rows in the database that no client created")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
