"""Hostile HTTP/1.1 over raw sockets against the service as production runs it (`python -m
backend`): header blocks too big, too many, too slow or never sent; what is under the limits is
served. Each test also sends what the guard must refuse, so that it fails without the guard.

The limits are the defaults (16 KiB, 100 fields) with HEADER_TIMEOUT_SECONDS=2 and
BODY_TIMEOUT_SECONDS=2 so that the deadline tests take seconds.
"""

import json
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.live_server import free_port
from tests.service_processes import SECRET, service_env, start_uvicorn, wait_healthy

LIMIT = 16 * 1024
FIELDS = 100
TIMEOUT = 2
# Sent in every refused header block: the server's log must never show it.
MARKER = b"hostile-marker-7f3a"


class Service:
    def __init__(self, port: int, pid: int, log: IO[bytes]) -> None:
        self.port, self.pid, self._log = port, pid, log

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log_lines(self) -> list[dict[str, Any]]:
        self._log.seek(0)
        lines = []
        for raw in self._log.read().splitlines():
            assert MARKER not in raw, f"a header's contents reached the log: {raw!r}"
            if raw.startswith(b"{"):
                lines.append(json.loads(raw))
        return lines

    def refusals(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == "http.refused"]


@contextmanager
def service(database_url: str, **settings: str) -> Iterator[Service]:
    port = free_port()
    with tempfile.TemporaryFile() as log:  # a pipe nobody reads would block the server
        process = start_uvicorn(
            # Two pooled connections: the database is shared, the requests here need few.
            service_env(database_url, DB_POOL_SIZE="2", **settings),
            port,
            "--no-access-log",
            output=log,
        )
        try:
            wait_healthy(process, port, timeout=60)
            yield Service(port, process.pid, log)
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[Service]:
    with service(
        database_url, HEADER_TIMEOUT_SECONDS=str(TIMEOUT), BODY_TIMEOUT_SECONDS=str(TIMEOUT)
    ) as running:
        yield running


# --- raw HTTP -------------------------------------------------------------------------------


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes (a reset after the answer counts as closed)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def read_one_response(sock: socket.socket) -> bytes:
    """One whole response off a kept-alive connection: its head, then its body by length (the
    two may come in separate segments)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        assert chunk, f"closed mid-response: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
    assert match is not None, head
    while len(body) < int(match[1]):
        chunk = sock.recv(4096)
        assert chunk, f"closed mid-body: {received + body!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in `raw`, each with its status, headers and body (by content-length)."""
    parsed = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        parsed.append((int(status_line.split()[1]), headers, raw[:length]))
        raw = raw[length:]
    return parsed


def exchange(server: Service, request: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    with server.connect() as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all of it was sent; the answer is still there to read
        return responses(read_all(sock))


def get(headers: bytes = b"", target: bytes = b"/health") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: test\r\n" + headers + b"\r\n"


def filler(size: int) -> bytes:
    """One header line of exactly `size` bytes (CRLF included)."""
    name = b"X-Filler-" + MARKER + b": "
    return name + b"a" * (size - len(name) - 2) + b"\r\n"


def block_of(size: int, target: bytes = b"/health", extra: bytes = b"") -> bytes:
    """A GET whose request line and headers are exactly `size` bytes, final CRLF included."""
    bare = len(get(extra, target))
    return get(extra + filler(size - bare), target)


def assert_refused(
    answer: list[tuple[int, dict[str, str], bytes]], status: int, detail: str
) -> None:
    assert len(answer) == 1, answer
    code, headers, body = answer[0]
    assert code == status, answer
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert detail in json.loads(body)["detail"]


def health_ms(server: Service) -> float:
    started = time.monotonic()
    assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10).status_code == 200
    return (time.monotonic() - started) * 1000


# --- too big -------------------------------------------------------------------------------


def test_one_huge_header_is_refused_at_once_while_others_are_served(server: Service) -> None:
    sock = server.connect()
    huge = get().replace(b"\r\n\r\n", b"\r\n") + b"X-Huge-" + MARKER + b": " + b"a" * 100_000_000

    def send() -> None:
        try:
            sock.sendall(huge)
        except OSError:
            pass  # refused and closed long before the 100 MB were sent

    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    sender.start()
    assert health_ms(server) < 1000  # the event loop is not held meanwhile
    answer = responses(read_all(sock))
    elapsed = time.monotonic() - started
    sender.join(timeout=10)
    sock.close()
    assert_refused(answer, 431, f"over {LIMIT} bytes")
    assert elapsed < 3, f"answered after {elapsed:.1f} s"
    assert not sender.is_alive()


def test_a_hundred_thousand_small_header_lines_are_refused(server: Service) -> None:
    """The cap on fields answers first: the first 16 KiB hold hundreds of these lines."""
    lines = b"".join(b"X-%d: %s\r\n" % (i, MARKER) for i in range(100_000))
    assert_refused(exchange(server, get(lines)), 431, f"More than {FIELDS} header fields")


def test_more_fields_than_the_cap_are_refused_and_the_cap_itself_served(server: Service) -> None:
    def fields(count: int) -> bytes:  # Host is one of them
        return b"".join(b"X-%d: %s\r\n" % (i, MARKER) for i in range(count - 1))

    assert [code for code, _, _ in exchange(server, get(fields(FIELDS)))] == [200]
    assert_refused(exchange(server, get(fields(FIELDS + 1))), 431, f"{FIELDS} header fields")


def test_a_request_line_over_the_limit_is_400(server: Service) -> None:
    target = b"/health?" + MARKER + b"=" + b"a" * LIMIT
    assert_refused(exchange(server, get(target=target)), 400, "Request line over")


def test_a_block_of_exactly_the_limit_is_served_and_one_byte_more_refused(
    server: Service,
) -> None:
    assert len(block_of(LIMIT)) == LIMIT
    assert [code for code, _, _ in exchange(server, block_of(LIMIT))] == [200]
    # Sent in small pieces too: the allowance is per request, not per read.
    with server.connect() as sock:
        request = block_of(LIMIT)
        for start in range(0, len(request), 1000):
            sock.sendall(request[start : start + 1000])
        sock.settimeout(10)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    assert_refused(exchange(server, block_of(LIMIT + 1)), 431, f"over {LIMIT} bytes")


def test_a_body_larger_than_the_limit_in_the_same_packet_as_the_headers_is_accepted(
    server: Service, committed_user: str, make_token: Callable[..., str]
) -> None:
    body = b'{"title": "a large body"' + b" " * (3 * LIMIT) + b"}"
    headers = (
        b"Authorization: Bearer " + make_token(committed_user, secret=SECRET).encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    )
    target = f"/api/{committed_user}/tasks".encode()
    request = b"POST " + target + b" HTTP/1.1\r\nHost: test\r\n" + headers + b"\r\n" + body
    [(status, _, created)] = exchange(server, request + get(b"Connection: close\r\n"))[:1]
    assert status == 201, created
    assert json.loads(created)["title"] == "a large body"
    # The same packet with a header block over the limit is not.
    padded = request.replace(b"Host: test\r\n", b"Host: test\r\n" + filler(LIMIT))
    assert_refused(exchange(server, padded), 431, f"over {LIMIT} bytes")


def test_pipelined_requests_each_under_the_limit_are_all_served(server: Service) -> None:
    """Four requests of 12 KiB each in one write (three limits' worth): the count restarts
    with each. A fifth, over the limit, is refused after the four are answered."""
    under = block_of(12 * 1024)
    over = block_of(LIMIT + 1)
    answer = exchange(server, under * 4 + over)
    assert [code for code, _, _ in answer] == [200, 200, 200, 200, 431], answer


# --- too slow ------------------------------------------------------------------------------


def test_trickled_headers_are_answered_408_at_the_deadline(server: Service) -> None:
    request = get(b"X-Slow-" + MARKER + b": " + b"a" * 20 + b"\r\n")
    with server.connect() as sock:
        started = time.monotonic()
        closed_at = None
        received = b""
        sock.settimeout(0.01)
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            deadline = time.monotonic() + 1  # one byte a second
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(4096)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                received += chunk
                if not chunk:
                    closed_at = time.monotonic() - started
                    break
            if closed_at is not None:
                break
    assert closed_at is not None, f"not disconnected after {len(request)} s"
    assert TIMEOUT - 0.5 < closed_at < TIMEOUT + 2, closed_at
    assert_refused(responses(received), 408, f"longer than {TIMEOUT} s")


def post_head(user: str, token: str, length: int) -> bytes:
    return (
        f"POST /api/{user}/tasks HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_body_not_complete_at_the_deadline_is_408_and_nothing_is_stored(
    server: Service, committed_user: str, make_token: Callable[..., str], database_url: str
) -> None:
    body = b'{"title": "never finished ' + MARKER + b'"}'
    token = make_token(committed_user, secret=SECRET)
    before = len(server.refusals())
    with server.connect() as sock:
        started = time.monotonic()
        sock.sendall(post_head(committed_user, token, len(body)) + body[:10])
        received = read_all(sock, timeout=TIMEOUT + 5)
        elapsed = time.monotonic() - started
    assert TIMEOUT - 0.5 < elapsed < TIMEOUT + 2, elapsed
    assert_refused(responses(received), 408, f"body took longer than {TIMEOUT} s")
    deadline = time.monotonic() + 5
    while len(server.refusals()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    [refusal] = server.refusals()[before:]
    assert (refusal["reason"], refusal["status"]) == ("body_timeout", 408)
    # The service went on serving, and the half-sent task was never created.
    listed = httpx.get(
        f"http://127.0.0.1:{server.port}/api/{committed_user}/tasks",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert listed.status_code == 200
    assert "never finished" not in listed.text
    errors = [line for line in server.log_lines() if line.get("level") in ("error", "critical")]
    assert errors == [], errors


def test_a_body_trickled_within_the_deadline_is_served_and_the_connection_kept(
    server: Service, committed_user: str, make_token: Callable[..., str]
) -> None:
    """The deadline is for the whole body from the end of the headers, not per read; once the
    body is in, nothing is left armed on the connection."""
    body = b'{"title": "slow but in time"}'
    token = make_token(committed_user, secret=SECRET)
    with server.connect() as sock:
        sock.settimeout(10)
        # Two such requests in turn, the second's body still coming in when the first's
        # deadline passes: it has a deadline of its own, from its own headers.
        for _ in range(2):
            sock.sendall(post_head(committed_user, token, len(body)))
            for start in range(0, len(body), 10):
                time.sleep(TIMEOUT / 5)
                sock.sendall(body[start : start + 10])
            [(status, _, _)] = responses(read_one_response(sock))
            assert status == 201
        time.sleep(TIMEOUT + 0.5)  # past the deadline the body had: still open, still served
        sock.sendall(get(b"Connection: close\r\n"))
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")


def test_a_body_never_sent_after_an_early_answer_only_closes_the_connection(
    server: Service, committed_user: str
) -> None:
    """Refused before its body was read (a bad token), the request's body never comes: at the
    deadline the connection is closed, with no second answer after the first."""
    with server.connect() as sock:
        sock.sendall(post_head(committed_user, "not-a-token", 100))
        received = read_all(sock, timeout=TIMEOUT + 5)
    [(status, _, _)] = responses(received)
    assert status == 401


def test_a_silent_connection_is_closed_at_the_deadline(server: Service) -> None:
    with server.connect() as sock:
        started = time.monotonic()
        assert read_all(sock, timeout=TIMEOUT + 5) == b""
        elapsed = time.monotonic() - started
    assert TIMEOUT - 0.5 < elapsed < TIMEOUT + 2, elapsed


def test_each_refusal_is_one_log_line_without_the_headers(server: Service) -> None:
    before = len(server.refusals())
    assert_refused(exchange(server, block_of(LIMIT + 1)), 431, f"over {LIMIT} bytes")
    deadline = time.monotonic() + 5
    while len(server.refusals()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    new = server.refusals()[before:]
    assert len(new) == 1, new
    assert new[0]["reason"] == "header_block_too_large"
    assert new[0]["status"] == 431
    assert new[0]["client"].startswith("127.0.0.1:")
    reasons = {line["reason"] for line in server.refusals()}
    assert reasons >= {"header_block_too_large"}  # the marker check is in log_lines


# --- memory --------------------------------------------------------------------------------


def test_fifty_unfinished_blocks_cost_a_few_megabytes(database_url: str) -> None:
    """50 connections each holding an unfinished block just under the limit, then each trying
    to send 512 KiB more: the server's resident memory grows by a few MB at most."""
    with service(database_url, HEADER_TIMEOUT_SECONDS="60") as running:
        for _ in range(3):
            health_ms(running)  # warm: the first requests allocate what every request reuses
        baseline = running.rss_bytes()
        unfinished = block_of(LIMIT - 100)[:-2]  # no final CRLF: the block is not complete
        sockets = [running.connect() for _ in range(50)]
        try:
            for sock in sockets:
                sock.sendall(unfinished)
            time.sleep(1)
            holding = running.rss_bytes() - baseline
            assert all(_still_open(sock) for sock in sockets), "an unfinished block was refused"
            assert holding < 4 * 2**20, f"{holding / 2**20:.1f} MB for 50 unfinished blocks"
            for sock in sockets:
                sock.settimeout(5)
                try:
                    sock.sendall(b"a" * 512 * 1024)
                except OSError:
                    pass  # refused meanwhile
            time.sleep(1)
            pushed = running.rss_bytes() - baseline
            assert pushed < 4 * 2**20, f"{pushed / 2**20:.1f} MB after 50 x 512 KiB more"
            for sock in sockets:
                assert_refused(responses(read_all(sock)), 431, f"over {LIMIT} bytes")
        finally:
            for sock in sockets:
                sock.close()


def _still_open(sock: socket.socket) -> bool:
    """Neither answered nor closed."""
    sock.settimeout(0.01)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    except OSError:
        pass
    return False
