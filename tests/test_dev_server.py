"""`./scripts/dev.sh` (`python -m backend.dev`) stops the embedded PostgreSQL it started.

Stopped by SIGTERM, then started again on the same data and stopped by SIGINT (Ctrl-C): each
time the postmaster is gone afterwards, and the next start finds a cluster that was shut down
cleanly, not one that needs crash recovery.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from conftest import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _serve_then_stop(data: Path, how: signal.Signals, log: Path) -> int:
    """Start the dev server on `data`, wait until it answers, stop it with `how`; returns the
    postmaster's pid."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BETTER_AUTH_SECRET")}
    env.update(DEV_DATA_DIR=str(data), PORT=str(port), LOG_LEVEL="WARNING")
    with log.open("ab") as output:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "backend.dev"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90  # a first start runs initdb
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        postmaster = int((data / "dev" / "postmaster.pid").read_text().split()[0])
        assert _running(postmaster)
        process.send_signal(how)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return postmaster


def test_stopping_the_dev_server_stops_its_postgres_cleanly():
    # Under the repository, not /tmp: when run as root, pgserver runs PostgreSQL as a user of
    # its own, which must be able to reach the data directory.
    (ROOT / ".pgdata").mkdir(exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="dev-test-", dir=ROOT / ".pgdata"))
    data.chmod(0o755)
    log = data / "dev-server.log"
    try:
        for how in (signal.SIGTERM, signal.SIGINT):
            postmaster = _serve_then_stop(data, how, log)
            deadline = time.monotonic() + 10
            while _running(postmaster) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _running(postmaster), f"PostgreSQL still runs after {how.name}"
            assert not (data / "dev" / "postmaster.pid").exists(), how.name
        postgres_log = (data / "dev" / "log").read_text()
        assert "not properly shut down" not in postgres_log
        assert "was interrupted" not in postgres_log
    finally:
        left_running = data / "dev" / "postmaster.pid"
        if left_running.exists():  # the test failed: stop it as the server should have
            os.kill(int(left_running.read_text().split()[0]), signal.SIGINT)
            time.sleep(2)
        shutil.rmtree(data, ignore_errors=True)
