"""The service's throughput and CPU per request as ratios of the baseline's (bench/baseline_app.py).

    .venv/bin/uv sync --frozen --extra dev --extra bench   # asyncpg, once
    .venv/bin/python bench/compare.py [--database-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--pooler [--pooler-prepared N]] [--workers N] [--min-cpu-ratio R] [--max-pg-ratio R]

It makes a fresh database on the given PostgreSQL (default $TEST_DATABASE_URL, else the local
server), starts the service (`python -m backend`, as production runs it) and the baseline
(`uvicorn`) on it, one uvicorn worker each (--workers), seeds users and tasks straight into the
tables, then for each operation runs wrk (bench/wrk.lua, as bench/run.py does) against the
service and the baseline in turn, --rounds times, and prints requests per second, p99 and the
ratio of the two sums.
Alternating keeps a machine whose speed drifts from favouring either. At the end both servers
stop and the database is dropped. Exit status 1 on any error or non-2xx answer.

CPU per request, which the neighbours on a shared machine disturb far less than req/s: around
each wrk run the CPU time (user+system, /proc/<pid>/stat) of the server's processes (the one
started and its descendants: every worker) and of PostgreSQL's (the postmaster and its
descendants; "-" when the server is not on this machine), divided by the requests wrk completed:
`cpu svc`/`cpu base` and `pg svc`/`pg base` in microseconds, with the ratios baseline/service
for cpu (below 1: the service costs more) and service/baseline for pg (above 1: it makes
PostgreSQL work more). A last line gives the lowest cpu ratio and the highest pg ratio;
--min-cpu-ratio and --max-pg-ratio make the exit status 1 past them. PostgreSQL's figure
counts whatever else its server does meanwhile: use a quiet one.

--pooler puts both servers behind one PgBouncer in transaction mode (the tests' own,
tests/pgbouncer.py; Neon's pooled endpoint is PgBouncer so): the service with it as
DATABASE_URL and the direct URL as DATABASE_URL_UNPOOLED (its migrations), the baseline's asyncpg
with statement_cache_size=0 unless the PgBouncer keeps prepared statements (1.21+ with
max_prepared_statements > 0, asked on its admin console; the choice is printed). PgBouncer's
own CPU per request is printed too (`pgb svc`, `pgb base`). --pooler-prepared N sets
max_prepared_statements (PgBouncer 1.21+, which Debian 12 does not package: $PGBOUNCER may
name another build's binary).

The data: 20 tasks for the user whose list and get are measured; 2,000 for the one whose tasks
update and toggle rotate over (as many users editing their own tasks would); a disjoint slice
of ids per delete run; creates go to a user of their own. Needs `wrk` (apt-get install wrk),
and pgbouncer for --pooler (apt-get install pgbouncer).
"""

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.error import URLError
from urllib.request import urlopen

import jwt
import psycopg2
from run import CREATE_BODY, LIST_SIZE, UPDATE_BODY, run_wrk
from sqlalchemy.engine import make_url

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OPERATIONS = ("list", "get", "create", "update", "toggle", "delete")
USERS = {"list": "lister", "get": "lister", "create": "creator", "update": "editor"}
USERS |= {"toggle": "editor", "delete": "deleter"}
EDITED_TASKS = 2000
DELETES_PER_SECOND = 8000  # more than either server deletes: a run never runs out of ids
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/<pid>/stat's CPU times
# Connections per worker, for both servers: the service's default DB_POOL_SIZE, the baseline's own.
POOL = 16


class Server(NamedTuple):
    url: str
    pid: int  # the process started; with --workers N, the parent of the workers


class Pooler(NamedTuple):
    url: str  # the benchmark's database through it
    pid: int
    version: str  # as SHOW VERSION answers: "PgBouncer 1.18.0"
    max_prepared_statements: int  # 0 when unset, and before 1.21, which has no such setting


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        sys.stderr.write("wrk is not installed (apt-get install wrk, brew install wrk)\n")
        return 2
    try:
        import asyncpg  # noqa: F401 - the baseline's driver, checked before anything starts
    except ImportError:
        sys.stderr.write(
            "asyncpg is missing: .venv/bin/uv sync --frozen --extra dev --extra bench\n"
        )
        return 2
    secret = secrets.token_urlsafe(48)
    with (
        fresh_database(args.database_url) as database_url,
        pgbouncer(database_url, args) as pooler,
    ):
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "BETTER_AUTH_SECRET": secret,
            "LOG_LEVEL": "WARNING",  # a line per request would measure the log
            "LOG_FORMAT": "json",
        }
        if pooler is not None:
            # As on Neon: requests through the pooler, the service's migrations direct.
            env |= {"DATABASE_URL": pooler.url, "DATABASE_URL_UNPOOLED": database_url}
            # Protocol-level prepared statements outlive a transaction only in a PgBouncer
            # that keeps them (1.21+, max_prepared_statements > 0); otherwise asyncpg must not
            # cache them (psycopg2, the service's driver, prepares none at that level).
            keeps = pooler_version(pooler.version) >= (1, 21) and pooler.max_prepared_statements
            cache = "100" if keeps else "0"
            env["BASELINE_STATEMENT_CACHE_SIZE"] = cache
            print(
                f"both servers through {pooler.version} (transaction mode, pool of "
                f"{POOL * args.workers}), max_prepared_statements {pooler.max_prepared_statements}:"
                f" the baseline's asyncpg with statement_cache_size={cache}"
            )
        with (
            server(["backend"], env, args.workers, "service") as service,
            server(
                ["uvicorn", "--app-dir", str(HERE), "baseline_app:app"],
                env,
                args.workers,
                "baseline",
            ) as baseline,
        ):
            ids = seed(database_url, args)
            tokens = {user: sign(user, secret) for user in set(USERS.values())}
            postmaster = postmaster_pid(database_url)
            if postmaster is None:
                print("PostgreSQL runs elsewhere: no CPU of its per request (pg columns: -)")
            groups = {"service": service.pid, "baseline": baseline.pid, "pg": postmaster}
            if pooler is not None:
                groups["pgbouncer"] = pooler.pid
            failed = False
            print(
                f"{'operation':<10}{'service':>10}{'baseline':>10}{'ratio':>8}"
                f"{'cpu svc':>10}{'cpu base':>10}{'ratio':>7}"
                f"{'pg svc':>9}{'pg base':>9}{'ratio':>7}"
                + (f"{'pgb svc':>9}{'pgb base':>9}" if pooler else "")
                + "   p99 ms service / baseline (each round)"
            )
            next_delete = 0
            cpu_ratios: dict[str, float] = {}
            pg_ratios: dict[str, float] = {}
            for op in args.ops:
                totals = {"service": 0.0, "baseline": 0.0}
                requests = {"service": 0.0, "baseline": 0.0}
                # CPU seconds of each group of processes while wrk ran against each server.
                cpu = {name: dict.fromkeys(groups, 0.0) for name in totals}
                p99s: dict[str, list[str]] = {"service": [], "baseline": []}
                for _ in range(args.rounds):
                    for name, url in (("service", service.url), ("baseline", baseline.url)):
                        op_ids: Sequence[int] = ids.get(op, ())
                        if op == "delete":
                            size = args.duration * DELETES_PER_SECOND
                            op_ids = ids["delete"][next_delete : next_delete + size]
                            next_delete += size
                        before = cpu_seconds(groups)
                        result = drive(args, url, op, tokens[USERS[op]], op_ids)
                        after = cpu_seconds(groups)
                        for group, seconds in after.items():
                            cpu[name][group] += seconds - before[group]
                        totals[name] += result["rps"]
                        requests[name] += result["requests"]
                        p99s[name].append(f"{result['p99_ms']:.0f}")
                        failed = failed or result["non2xx"] > 0 or result["errors"] > 0
                        if result["non2xx"] or result["errors"]:
                            print(f"  {op} on the {name}: {result}", file=sys.stderr)
                ratio = totals["service"] / totals["baseline"]
                # Microseconds of CPU per request wrk completed, each server's own processes
                # ("cpu") and PostgreSQL's ("pg") while that server was driven.
                per_request = {
                    name: {
                        group: 1e6 * cpu[name][group] / requests[name]
                        if requests[name] and groups[group] is not None
                        else None
                        for group in groups
                    }
                    for name in totals
                }
                ours, theirs = per_request["service"], per_request["baseline"]
                cpu_ratio = quotient(theirs["baseline"], ours["service"])
                pg_ratio = quotient(ours["pg"], theirs["pg"])
                if cpu_ratio is not None:
                    cpu_ratios[op] = cpu_ratio
                if pg_ratio is not None:
                    pg_ratios[op] = pg_ratio
                print(
                    f"{op:<10}{totals['service'] / args.rounds:>10.0f}"
                    f"{totals['baseline'] / args.rounds:>10.0f}{ratio:>8.2f}"
                    f"{column(ours['service'], 10)}{column(theirs['baseline'], 10)}"
                    f"{column(cpu_ratio, 7, '.2f')}"
                    f"{column(ours['pg'], 9)}{column(theirs['pg'], 9)}"
                    f"{column(pg_ratio, 7, '.2f')}"
                    + (
                        f"{column(ours['pgbouncer'], 9)}{column(theirs['pgbouncer'], 9)}"
                        if pooler
                        else ""
                    )
                    + f"   {' '.join(p99s['service'])} / {' '.join(p99s['baseline'])}"
                )
            print(
                f"wrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} rounds per "
                f"operation alternating, {args.workers} uvicorn worker(s) each; req/s averaged"
            )
            print(
                "cpu: the server's processes (all its workers), pg: PostgreSQL's, in us of CPU "
                "(user+system) per request wrk completed;"
                + (" pgb: PgBouncer's;" if pooler else "")
                + "\nratios: baseline/service for cpu, service/baseline for pg"
            )
            failed = summarize(args, cpu_ratios, pg_ratios) or failed
    return 1 if failed else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL where this user may create databases",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per server")
    parser.add_argument(
        "--ops", type=lambda s: s.split(","), default=list(OPERATIONS), help="list,get,..."
    )
    parser.add_argument(
        "--pooler",
        action="store_true",
        help="both servers through one PgBouncer in transaction mode (the tests' own)",
    )
    parser.add_argument(
        "--pooler-prepared",
        type=int,
        default=0,
        metavar="N",
        help="with --pooler: max_prepared_statements = N (PgBouncer 1.21+; $PGBOUNCER names "
        "the binary)",
    )
    parser.add_argument(
        "--min-cpu-ratio",
        type=float,
        help="exit 1 if an operation's CPU per request, baseline/service, is below this",
    )
    parser.add_argument(
        "--max-pg-ratio",
        type=float,
        help="exit 1 if an operation's PostgreSQL CPU per request, service/baseline, is above this",
    )
    args = parser.parse_args()
    args.threads = 1  # what run_wrk reads
    return args


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    server = make_url(server_url.replace("postgres://", "postgresql://", 1))
    name = f"todo_compare_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(libpq(server.render_as_string(hide_password=False)))
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextmanager
def pgbouncer(database_url: str, args: argparse.Namespace) -> Iterator[Pooler | None]:
    """With --pooler, a PgBouncer in transaction mode in front of the database (the one the
    tests start, tests/pgbouncer.py) until the block ends; else None. Its pool holds as many
    server connections as one server's pool (the two are driven in turn), and keeps them as
    long as PgBouncer does by default (an hour; 10 minutes idle), not recycled every few
    seconds as in the tests: what is measured is the pooler in the path, not reconnections."""
    if not args.pooler:
        yield None
        return
    sys.path.insert(0, str(ROOT))
    from tests.pgbouncer import pgbouncer_process

    with pgbouncer_process(
        database_url,
        server_lifetime=3600,
        server_idle_timeout=600,
        pool_size=POOL * args.workers,
        max_prepared_statements=args.pooler_prepared,
    ) as bouncer:
        admin = psycopg2.connect(libpq(bouncer.admin_url))
        admin.autocommit = True  # the admin console knows no transactions
        try:
            with admin.cursor() as cursor:
                cursor.execute("SHOW VERSION")
                version = str(cursor.fetchone()[0])
                cursor.execute("SHOW CONFIG")
                config = {str(row[0]): str(row[1]) for row in cursor.fetchall()}
        finally:
            admin.close()
        prepared = int(config.get("max_prepared_statements", "0"))
        yield Pooler(bouncer.url, bouncer.pid, version, prepared)


def pooler_version(version: str) -> tuple[int, int]:
    """(major, minor) of SHOW VERSION's "PgBouncer 1.18.0"; (0, 0) if it says no such thing."""
    found = re.search(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def server(module: list[str], env: dict[str, str], workers: int, name: str) -> Iterator[Server]:
    """`python -m <module...>` (uvicorn's options) on a free port until the block ends; yields
    its base URL and process id."""
    port = free_port()
    log = tempfile.TemporaryFile()  # a pipe nobody reads would block the server
    process = subprocess.Popen(  # noqa: S603 - our own interpreter, fixed arguments
        [sys.executable, "-m", *module, "--port", str(port), "--no-access-log"]
        + ["--log-level", "warning", "--workers", str(workers)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310 - our URL
                    if response.status == 200:
                        break
            except (URLError, ConnectionError):
                pass  # not listening yet
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"the {name} did not start:\n{log.read().decode()[-2000:]}")
            time.sleep(0.2)
        yield Server(url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def summarize(
    args: argparse.Namespace, cpu_ratios: dict[str, float], pg_ratios: dict[str, float]
) -> bool:
    """Print the worst CPU ratios over the operations; true if one is past its threshold."""
    parts, over = [], []
    if cpu_ratios:
        op = min(cpu_ratios, key=cpu_ratios.__getitem__)
        parts.append(f"cpu ratio (baseline/service) min {cpu_ratios[op]:.2f} ({op})")
        if args.min_cpu_ratio is not None and cpu_ratios[op] < args.min_cpu_ratio:
            over.append(f"cpu ratio of {op} below --min-cpu-ratio {args.min_cpu_ratio}")
    if pg_ratios:
        op = max(pg_ratios, key=pg_ratios.__getitem__)
        parts.append(f"pg ratio (service/baseline) max {pg_ratios[op]:.2f} ({op})")
        if args.max_pg_ratio is not None and pg_ratios[op] > args.max_pg_ratio:
            over.append(f"pg ratio of {op} above --max-pg-ratio {args.max_pg_ratio}")
    if parts:
        print("; ".join(parts), flush=True)
    for line in over:
        print(line, file=sys.stderr)
    return bool(over)


def quotient(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def column(value: float | None, width: int, spec: str = ".0f") -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def cpu_seconds(roots: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds (user and system) so far of each root process and all its descendants, from
    /proc/<pid>/stat: uvicorn's workers are children of the process started, PostgreSQL's
    backends of the postmaster. Each process counts its reaped children's too (fields 16 and
    17), so that one that exited during a run (a backend whose connection the pooler closed)
    keeps counting."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue  # gone since the directory was listed
        # After the command name, in parentheses that may hold anything: field 3 on.
        fields = text[text.rindex(b")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])  # field 4
        ticks[pid] = sum(int(field) for field in fields[11:15])  # fields 14-17
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found = {}
    for name, root in roots.items():
        total, todo = 0, [root] if root in ticks else []
        while todo:
            pid = todo.pop()
            total += ticks[pid]
            todo.extend(children.get(pid, ()))
        found[name] = total / CLOCK_TICKS
    return found


def postmaster_pid(database_url: str) -> int | None:
    """The PostgreSQL server's main process, whose descendants are all of its processes; None
    if the server does not run on this machine (its backend is no `postgres` process here)."""
    connection = psycopg2.connect(libpq(database_url))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend = cursor.fetchone()[0]
        try:  # while the backend is still there
            with open(f"/proc/{backend}/stat", "rb") as stat:
                text = stat.read()
            parent = int(text[text.rindex(b")") + 2 :].split()[1])
            with open(f"/proc/{parent}/comm", "rb") as comm:
                name = comm.read().strip()
        except (OSError, ValueError):
            return None
    finally:
        connection.close()
    if not text.startswith(f"{backend} (postgres)".encode()) or name != b"postgres":
        return None
    return parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(database_url: str, args: argparse.Namespace) -> dict[str, list[int]]:
    """Users and tasks straight into the tables the service created; returns the ids each
    operation works on."""
    deletes = 2 * args.rounds * args.duration * DELETES_PER_SECOND
    with psycopg2.connect(libpq(database_url)) as connection, connection.cursor() as cursor:
        for user in set(USERS.values()):
            cursor.execute(
                'INSERT INTO "user" (id, name, email) VALUES (%s, %s, %s)',
                (user, user, f"{user}@bench.invalid"),
            )

        def tasks(user: str, count: int, title: str) -> list[int]:
            cursor.execute(
                "INSERT INTO tasks (user_id, title, description, completed) "
                "SELECT %s, %s || g, 'some words here', g %% 3 = 0 "
                "FROM generate_series(1, %s) g RETURNING id",
                (user, title, count),
            )
            return sorted(row[0] for row in cursor.fetchall())

        listed = tasks("lister", LIST_SIZE, "task ")
        edited = tasks("editor", EDITED_TASKS, "edited ")
        doomed = tasks("deleter", deletes, "doomed ")
    connection.close()
    connection = psycopg2.connect(libpq(database_url))
    connection.autocommit = True  # VACUUM runs outside a transaction
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE tasks")
        cursor.execute("CHECKPOINT")
    connection.close()
    return {"get": listed[:1], "update": edited, "toggle": edited, "delete": doomed}


def sign(user: str, secret: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 86400}, secret, algorithm="HS256")


def drive(
    args: argparse.Namespace, url: str, op: str, token: str, ids: Sequence[int]
) -> dict[str, float]:
    user = USERS[op]
    base = f"/api/{user}/tasks"
    method, path, body = {
        "list": ("GET", base, None),
        "get": ("GET", base + "/{id}", None),
        "create": ("POST", base, CREATE_BODY),
        "update": ("PUT", base + "/{id}", UPDATE_BODY),
        "toggle": ("PATCH", base + "/{id}/complete", None),
        "delete": ("DELETE", base + "/{id}", None),
    }[op]
    run_args = argparse.Namespace(**{**vars(args), "url": url})
    with tempfile.NamedTemporaryFile("w", prefix="todo-compare-", suffix=".ids") as ids_file:
        ids_file.write("".join(f"{i}\n" for i in ids))
        ids_file.flush()
        result: Any = run_wrk(run_args, token, method, path, body, ids_file.name)
    return result  # type: ignore[no-any-return]


if __name__ == "__main__":
    sys.exit(main())
