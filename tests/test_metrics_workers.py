"""Metrics of a real `uvicorn --workers 2`: whichever worker answers a scrape, it reports every
worker's requests, exactly; a worker that dies leaves its counts and takes its gauges along.

PROMETHEUS_MULTIPROC_DIR is left unset, as an operator would: the workers choose their shared
directory themselves (in TMPDIR, here the test's own directory).
"""

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.live_server import free_port
from tests.test_metrics import DURATION, METRICS_TOKEN, SCRAPE, TASK_ROUTE, Samples, samples, value

ROOT = Path(__file__).resolve().parent.parent
SECRET = "workers-test-secret-0123456789-abcdefghij"
POOL_SIZE = 3


class Workers:
    def __init__(self, base: str, tmp: Path) -> None:
        self.base, self.tmp = base, tmp

    def scrape(self) -> Samples:
        # A new connection each time, so that either worker may answer.
        response = httpx.get(f"{self.base}/metrics", headers=SCRAPE, timeout=10)
        assert response.status_code == 200, response.text
        return samples(response.text)

    def scrape_text(self) -> str:
        return httpx.get(f"{self.base}/metrics", headers=SCRAPE, timeout=10).text

    def directory(self) -> Path:
        (path,) = self.tmp.glob("todo-api-metrics-*")
        return path

    def pids_with(self, kind: str) -> set[int]:
        return {int(f.stem.rsplit("_", 1)[1]) for f in self.directory().glob(f"{kind}_*.db")}

    def idle_connections(self) -> float:
        scraped = self.scrape()
        return sum(
            count
            for (name, labels), count in scraped.items()
            if name == "db_client_connection_count"
            and ("db_client_connection_state", "idle") in labels
        )

    def wait_for_idle(self, expected: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (seen := self.idle_connections()) != expected:
            assert time.monotonic() < deadline, f"idle connections {seen}, expected {expected}"
            time.sleep(0.2)


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[Workers]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        DATABASE_URL=database_url,
        BETTER_AUTH_SECRET=SECRET,
        METRICS_TOKEN=METRICS_TOKEN,
        DB_POOL_SIZE=str(POOL_SIZE),
        LOG_FORMAT="json",
        LOG_LEVEL="WARNING",
        TMPDIR=str(tmp_path),
    )
    log = (tmp_path / "uvicorn.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "backend", "--port", str(port)]
        + ["--workers", "2", "--timeout-graceful-shutdown", "5"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    service = Workers(f"http://127.0.0.1:{port}", tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{service.base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (tmp_path / "uvicorn.log").read_text()
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        # Both workers are up once both have published their open connections.
        service.wait_for_idle(2 * POOL_SIZE)
        yield service
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_two_workers_report_exact_totals_and_keep_counts_of_a_dead_worker(
    workers: Workers, committed_user: str, make_token: Callable[..., str]
):
    token = make_token(committed_user, secret=SECRET)
    owner = {"Authorization": f"Bearer {token}"}
    forged = {"Authorization": f"Bearer {make_token(committed_user, secret='f' * 40)}"}
    tasks = f"{workers.base}/api/{committed_user}/tasks"
    task_id = httpx.post(tasks, json={"title": "counted"}, headers=owner).json()["id"]

    requests = [(f"{tasks}/{task_id}", owner)] * 40 + [(tasks, {})] * 10 + [(tasks, forged)] * 5

    def send(request: tuple[str, dict[str, str]]) -> int:
        url, headers = request
        return httpx.get(url, headers=headers, timeout=10).status_code  # a new connection each

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(send, requests))
    assert statuses == [200] * 40 + [401] * 15

    def check_totals(scraped: Samples) -> None:
        route = {"http_request_method": "GET", "http_route": TASK_ROUTE}
        assert value(scraped, f"{DURATION}_count", **route, http_response_status_code="200") == 40
        post = {"http_request_method": "POST", "http_route": "/api/{user_id}/tasks"}
        assert value(scraped, f"{DURATION}_count", **post, http_response_status_code="201") == 1
        listing = {"http_request_method": "GET", "http_route": "/api/{user_id}/tasks"}
        assert value(scraped, f"{DURATION}_count", **listing, http_response_status_code="401") == 15
        assert value(scraped, "todo_auth_failures_total", reason="missing_token") == 10
        assert value(scraped, "todo_auth_failures_total", reason="bad_signature") == 5

    # Both workers served some of them, and every scrape (answered by either) has the sum.
    assert len(workers.pids_with("histogram")) == 2
    for _ in range(6):
        check_totals(workers.scrape())
    text = workers.scrape_text()
    assert committed_user not in text
    assert token not in text and token.split(".")[2] not in text
    assert METRICS_TOKEN not in text
    assert re.search(r"task_id=|user_id=", text) is None

    # A worker killed outright: uvicorn starts another; what the dead one counted stays, its
    # gauges (its connections, now closed) go, so the pool adds up to the live workers' again.
    victim = min(workers.pids_with("gauge_livesum"))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (
        victim in workers.pids_with("gauge_livesum") or len(workers.pids_with("gauge_livesum")) < 2
    ):
        assert time.monotonic() < deadline, "the dead worker's gauges stayed, or none replaced it"
        workers.scrape()  # a scrape is what notices the dead worker
        time.sleep(0.2)
    workers.wait_for_idle(2 * POOL_SIZE)
    check_totals(workers.scrape())
