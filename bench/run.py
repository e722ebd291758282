"""Load-test a running Todo API, one operation at a time, with wrk.

    python bench/run.py --url http://127.0.0.1:8000 --user <user id> [--database-url URL]

It signs a token for the user with BETTER_AUTH_SECRET (or takes --token), seeds the user's tasks
through the API, drives list, get, create, update, toggle and delete in turn for --duration
seconds each at --connections open connections, prints requests per second, p50 and p99
latency per operation, and deletes every task of the user when done. The user must exist in
Better Auth's users table; with --database-url it is created there if missing. Needs `wrk`
(`apt-get install wrk`, `brew install wrk`) and the project's dependencies (PyJWT, psycopg2).
Exit status 1 when any request failed or answered other than 2xx.

With --database-url it also samples `pg_stat_activity` every 10 ms while each operation runs
and prints what the service's connections (application_name `todo-api`) were doing while a
statement of theirs was active: on the CPU, or waiting, and on what. That tells a slow p99 that
is the database's (writes waiting for the WAL to reach the disk: `IO:WALSync`,
`LWLock:WALWrite`) from one that is the service's (the database mostly idle).
"""

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

HERE = Path(__file__).resolve().parent
LIST_SIZE = 20  # tasks the list and get operations see
EDITED_TASKS = 1000  # tasks update and toggle rotate over, so that requests seldom share a row
UPDATE_BODY = {"title": "renamed under load", "description": "edited", "completed": False}
CREATE_BODY = {"title": "created under load", "description": "one of many"}


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        sys.stderr.write("wrk is not installed (apt-get install wrk, brew install wrk)\n")
        return 2
    if args.database_url:
        ensure_user(args.database_url, args.user, args.users_table)
    token = args.token or sign_token(args.user)
    api = Api(args.url, args.user, token)
    api.delete_all()  # a previous run that was interrupted leaves its tasks behind

    prefix = urlsplit(args.url).path.rstrip("/")
    base = f"{prefix}/api/{args.user}/tasks"
    results = []

    waits: dict[str, WaitSamples] = {}

    def measure(
        name: str, method: str, path: str, body: Any = None, ids: Sequence[int] = ()
    ) -> None:
        with (
            tempfile.NamedTemporaryFile("w", prefix="todo-bench-", suffix=".ids") as ids_file,
            sampled_waits(args.database_url, args.application_name) as seen,
        ):
            ids_file.write("".join(f"{i}\n" for i in ids))
            ids_file.flush()
            results.append((name, run_wrk(args, token, method, path, body, ids_file.name)))
        waits[name] = seen

    listed = api.seed(LIST_SIZE)
    measure("list", "GET", base)  # exactly the 20 tasks just seeded
    measure("get", "GET", base + "/{id}", ids=listed)
    edited = listed + api.seed(EDITED_TASKS - LIST_SIZE)
    measure("update", "PUT", base + "/{id}", UPDATE_BODY, edited)
    measure("toggle", "PATCH", base + "/{id}/complete", ids=edited)
    measure("create", "POST", base, CREATE_BODY)
    # Every task the create run made, and the seeded ones: more than a delete run of the same
    # length uses up, unless deletes are much faster than creates (then non-2xx shows it).
    measure("delete", "DELETE", base + "/{id}", ids=api.task_ids())
    api.delete_all()

    print(f"{'operation':<10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>10}{'errors':>8}")
    failed = False
    for name, r in results:
        print(
            f"{name:<10}{r['rps']:>10.0f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}"
            f"{r['non2xx']:>10.0f}{r['errors']:>8.0f}"
        )
        failed = failed or r["non2xx"] > 0 or r["errors"] > 0
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s per operation "
        f"against {args.url}"
    )
    if args.database_url:
        print(f"\nthe service's statements in the database ({args.application_name!r} sessions):")
        for name, _ in results:
            print(f"{name:<10}{waits[name].describe()}")
    return 1 if failed else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    parser.add_argument("--user", default="bench-user", help="the user id whose tasks are used")
    parser.add_argument("--token", help="a bearer token for the user (default: signed here)")
    parser.add_argument(
        "--database-url", help="create the user in the users table if missing (optional)"
    )
    parser.add_argument("--users-table", default=os.environ.get("AUTH_USER_TABLE", "user"))
    parser.add_argument(
        "--application-name",
        default="todo-api",
        help="whose database sessions to sample with --database-url (the service's is todo-api)",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per operation")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    return parser.parse_args()


def sign_token(user: str) -> str:
    secret = os.environ.get("BETTER_AUTH_SECRET")
    if not secret:
        raise SystemExit("set BETTER_AUTH_SECRET (the service's) or pass --token")
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, secret, algorithm="HS256")


def ensure_user(database_url: str, user: str, table: str) -> None:
    import psycopg2  # noqa: PLC0415 - only needed with --database-url
    from psycopg2 import sql  # noqa: PLC0415

    insert = sql.SQL(
        'INSERT INTO {} (id, name, email, "emailVerified", "createdAt", "updatedAt") '
        "VALUES (%s, %s, %s, false, now(), now()) ON CONFLICT DO NOTHING"
    ).format(sql.Identifier(table))
    with psycopg2.connect(_libpq_url(database_url)) as connection, connection.cursor() as cursor:
        cursor.execute(insert, (user, user, f"{user}@bench.invalid"))
    connection.close()


WAIT_SAMPLE_SECONDS = 0.01
ACTIVE_STATEMENTS = """
    SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU')
    FROM pg_stat_activity
    WHERE application_name = %s AND state = 'active' AND pid <> pg_backend_pid()
"""


@dataclass
class WaitSamples:
    """How many times `pg_stat_activity` was read, and what the active statements were doing
    each time, counted: `CPU` or their wait event (`IO:WALSync`, ...)."""

    samples: int = 0
    doing: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        """`3.6 active on average (429 samples): LWLock:WALWrite 82%, IO:WALSync 12%, ...`"""
        active = sum(self.doing.values())
        if not active:
            return "no active statement seen"
        shares = ", ".join(f"{what} {n / active:.0%}" for what, n in self.doing.most_common(4))
        return f"{active / self.samples:4.1f} active on average ({self.samples} samples): {shares}"


@contextmanager
def sampled_waits(database_url: str | None, application_name: str) -> Iterator[WaitSamples]:
    """Sample, every 10 ms until the block ends, what each active statement of the service's
    sessions is doing. Without a database URL, samples nothing."""
    seen = WaitSamples()
    if not database_url:
        yield seen
        return
    import psycopg2  # noqa: PLC0415 - only needed with --database-url

    connection = psycopg2.connect(_libpq_url(database_url))
    connection.autocommit = True  # each query a new snapshot of pg_stat_activity
    done = threading.Event()

    def sample() -> None:
        with connection.cursor() as cursor:
            while not done.wait(WAIT_SAMPLE_SECONDS):
                cursor.execute(ACTIVE_STATEMENTS, (application_name,))
                seen.samples += 1
                seen.doing.update(what for (what,) in cursor.fetchall())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join()
        connection.close()


def _libpq_url(database_url: str) -> str:
    return re.sub(r"^postgres(ql)?\+\w+://", "postgresql://", database_url)


class Api:
    """The few plain calls seeding and cleaning up need, on one keep-alive connection."""

    def __init__(self, url: str, user: str, token: str) -> None:
        parts = urlsplit(url)
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self._connection = connection_class(parts.netloc, timeout=30)
        self._base = f"{parts.path.rstrip('/')}/api/{user}/tasks"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def _call(self, method: str, path: str = "", body: Any = None, missing_ok: bool = False) -> Any:
        payload = None if body is None else json.dumps(body)
        try:
            self._connection.request(method, self._base + path, payload, self._headers)
            response = self._connection.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):
            # The server closed the idle keep-alive connection (while wrk ran): reconnect once.
            self._connection.close()
            self._connection.request(method, self._base + path, payload, self._headers)
            response = self._connection.getresponse()
        data = response.read()
        if missing_ok and response.status == 404:
            return None
        if response.status >= 300:
            raise SystemExit(f"{method} {self._base}{path}: {response.status} {data[:200]!r}")
        return json.loads(data)

    def seed(self, count: int) -> list[int]:
        return [self._call("POST", "", {"title": f"task {n}"})["id"] for n in range(count)]

    def task_ids(self) -> list[int]:
        return [task["id"] for task in self._call("GET")]

    def delete_all(self) -> None:
        for task_id in self.task_ids():
            # 404: a request wrk left in flight when it stopped deleted it meanwhile.
            self._call("DELETE", f"/{task_id}", missing_ok=True)


def run_wrk(
    args: argparse.Namespace,
    token: str,
    method: str,
    path: str,
    body: Any,
    ids_file: str,
) -> dict[str, float]:
    env = {
        **os.environ,
        "BENCH_METHOD": method,
        "BENCH_PATH": path,
        "BENCH_BODY": "" if body is None else json.dumps(body),
        "BENCH_TOKEN": token,
        "BENCH_IDS": ids_file,
        "BENCH_THREADS": str(args.threads),
    }
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "wrk.lua"),
        args.url,
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=True)  # noqa: S603
    output = finished.stdout
    line = next((x for x in output.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no result:\n{output}")
    fields = {key: float(value) for key, value in re.findall(r"(\w+)=([\d.]+)", line)}
    fields["rps"] = fields["requests"] / fields["seconds"]
    return fields


if __name__ == "__main__":
    sys.exit(main())
