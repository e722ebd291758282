"""PgBouncer (the system's package), started by the tests: a transaction-mode pooler like Neon's.

`pgbouncer(upstream_url)` runs one on a free port in front of the PostgreSQL server of
`upstream_url` and yields the same URL through it; `pgbouncer_process` yields a `PgBouncer`,
with its process id and admin console too (bench/compare.py --pooler runs one). Server
connections are recycled every few seconds by default (server_lifetime, server_idle_timeout),
as managed poolers do, so that a statement finds a server connection that never saw what an
earlier one did: what works here does not work by luck. PgBouncer refuses to run as root; as
root it is started as `postgres`.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.live_server import free_port
from tests.tcp_proxy import TcpProxy

RUN_AS = "postgres"


def pgbouncer_binary() -> str:
    """$PGBOUNCER (another build than the system's, say), else the one on the PATH."""
    found = os.environ.get("PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(found, os.X_OK):
        raise RuntimeError("pgbouncer is not installed (Debian: apt-get install -y pgbouncer)")
    return found


@dataclass(frozen=True)
class PgBouncer:
    url: str  # the upstream URL, through PgBouncer
    admin_url: str  # its admin console (database `pgbouncer`): SHOW VERSION, SHOW CONFIG, ...
    pid: int


@contextmanager
def pgbouncer(
    upstream_url: str,
    *,
    server_lifetime: int = 3,
    server_idle_timeout: int = 2,
    pool_size: int = 20,
) -> Iterator[str]:
    """Yield `upstream_url` (any database on that server) through a new PgBouncer."""
    with pgbouncer_process(
        upstream_url,
        server_lifetime=server_lifetime,
        server_idle_timeout=server_idle_timeout,
        pool_size=pool_size,
    ) as bouncer:
        yield bouncer.url


@contextmanager
def pgbouncer_process(
    upstream_url: str,
    *,
    server_lifetime: int = 3,
    server_idle_timeout: int = 2,
    pool_size: int = 20,
    max_prepared_statements: int = 0,
) -> Iterator[PgBouncer]:
    """`pgbouncer`, yielding the process as well as the URL through it."""
    upstream = make_url(upstream_url.replace("postgres://", "postgresql://", 1))
    host, upstream_port = upstream.host, upstream.port or 5432
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pgbouncer-") as directory, ExitStack() as stack:
        if host is None:
            # The embedded server listens on a Unix socket in a directory only its own user
            # may enter; PgBouncer (another user) reaches it through a TCP relay of ours.
            relay = TcpProxy(_unix_socket(f"{upstream.query['host']}/.s.PGSQL.{upstream_port}"))
            stack.callback(relay.close)
            host, upstream_port = "127.0.0.1", relay.port
        work = Path(directory)
        user, password = upstream.username or "postgres", upstream.password or ""
        (work / "userlist.txt").write_text(f'"{user}" "{password}"\n')
        (work / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={upstream_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {work / 'userlist.txt'}\n"
            f"logfile = {work / 'pgbouncer.log'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 2000\n"
            f"server_lifetime = {server_lifetime}\n"
            f"server_idle_timeout = {server_idle_timeout}\n"
            # Managed poolers answer a client that waits for a server within a bound too.
            "query_wait_timeout = 30\n"
            # A refused login (the server full for a moment) is retried after 1 s, not 15.
            "server_login_retry = 1\n"
            f"admin_users = {user}\n"
            # Protocol-level prepared statements kept across server connections (1.21+; an
            # older PgBouncer does not know the setting, so it is written only when asked for).
            + (
                f"max_prepared_statements = {max_prepared_statements}\n"
                if max_prepared_statements
                else ""
            )
        )
        command = [pgbouncer_binary(), str(work / "pgbouncer.ini")]
        if os.geteuid() == 0:
            account = pwd.getpwnam(RUN_AS)
            for path in [work, *work.iterdir()]:
                os.chown(path, account.pw_uid, account.pw_gid)
            command += ["-u", RUN_AS]
        # Its log goes to the log file; not to a pipe nobody reads, which once full would stop
        # PgBouncer dead in its next write (it logs every connection).
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_until_listening(process, port, work / "pgbouncer.log")
            pooled = upstream.set(host="127.0.0.1", port=port).difference_update_query(["host"])
            yield PgBouncer(
                url=pooled.render_as_string(hide_password=False),
                admin_url=pooled.set(database="pgbouncer").render_as_string(hide_password=False),
                pid=process.pid,
            )
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _unix_socket(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(path)
        return sock

    return connect


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {process.returncode}: {_read(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"pgbouncer did not listen on {port}: {_read(log)}")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
