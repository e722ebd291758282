"""Better Auth's public signing keys (its JWT plugin's JWKS): fetched off the event loop within a
deadline, cached, refetched at most once per interval, and served stale, for a stated while, when
the endpoint is slow or down.

`key_for()` never does I/O and never waits. A token whose `kid` we hold is verified with that key
while the keys are fresh (`max_age`) and, past that, while they are stale (`stale_for` seconds
more): a stale key starts a refresh in the background (when the interval allows) and the request
goes on with the key it has. Only when a fetch could tell (a `kid` not seen yet, or keys past the
stale window) and one is under way or allowed does it raise `KeysOutdated`; the caller then
awaits `refresh_async()`, which returns when that fetch ends or at its deadline, whichever comes
first, and asks again with `may_wait=False`. Fetches are spaced by `min_interval` whatever
happens, so a flood of forged `kid`s costs the JWKS endpoint one request per interval, and a
failed fetch keeps the keys we already hold.

Each fetch is bounded as a whole by `timeout` (`fetch_url`): an endpoint that trickles its answer
a byte at a time held every request that needed the keys for as long as it liked (urllib applies
its timeout to each read, not to the fetch).
"""

import asyncio
import base64
import contextlib
import http.client
import io
import json
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import structlog
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from backend.platform.logging import redacted_url
from backend.platform.telemetry.metrics import count_jwks_fetch

log = structlog.get_logger("backend.jwks")

# What Better Auth's `jwks.keyPairConfig.alg` can be, and what each public key may verify. A
# JWK's own `alg` narrows it to one; symmetric (`oct`) keys are never taken from a JWKS.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_ALGORITHMS_FOR_KEY: dict[tuple[str, str | None], frozenset[str]] = {
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("RSA", None): _RSA,
}
MAX_JWKS_BYTES = 256 * 1024

Fetch = Callable[[str, float], bytes]


class KeysOutdated(Exception):
    """Only a fetch of the JWKS can answer; one is allowed now."""


class KeysUnavailable(Exception):
    """No key we may trust can tell, and no fetch is allowed now: none was ever fetched, or the
    token's key was last fetched longer ago than `max_age + stale_for` (the client gets a 503)."""


class UnexpectedStatus(OSError):
    """The JWKS endpoint answered with another status than 200 (redirects are not followed)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"JWKS endpoint answered HTTP {status}")
        self.status = status


class KeyRejected(Exception):
    """No key we hold may verify this token (unknown `kid`, or an `alg` its key is not for)."""


class _PublicKey:
    def __init__(self, jwk: dict[str, Any], algorithms: frozenset[str]) -> None:
        self.jwk = jwk
        self.algorithms = algorithms
        self._by_algorithm: dict[str, PyJWK] = {}

    def for_algorithm(self, algorithm: str) -> PyJWK:
        key = self._by_algorithm.get(algorithm)
        if key is None:
            key = self._by_algorithm[algorithm] = PyJWK(self.jwk, algorithm)
        return key


def parse_jwks(document: bytes) -> dict[str, _PublicKey]:
    """The usable public keys of a JWKS by `kid`; raises ValueError if it is not a JWKS."""
    data = json.loads(document)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK Set")
    keys: dict[str, _PublicKey] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            continue
        kty, crv = jwk.get("kty"), jwk.get("crv")
        if not isinstance(kty, str) or not isinstance(crv, str | None):
            continue
        algorithms = _ALGORITHMS_FOR_KEY.get((kty, None if kty == "RSA" else crv))
        if algorithms is None:  # `oct` and anything else we cannot verify with
            continue
        declared = jwk.get("alg")
        if declared is not None:
            if declared not in algorithms:
                continue  # a key that claims an algorithm its type cannot do
            algorithms = frozenset({declared})
        if jwk.get("use", "sig") != "sig":
            continue
        try:
            key = _PublicKey(jwk, algorithms)
            key.for_algorithm(next(iter(sorted(algorithms))))  # a malformed key fails here
        except (PyJWTError, ValueError, TypeError):
            continue
        keys[jwk["kid"]] = key
    return keys


def fetch_url(url: str, timeout: float, *, tls: ssl.SSLContext | None = None) -> bytes:
    """GET the JWKS at `url` within `timeout` seconds in all: connecting (each address in turn),
    TLS, the request, the status line and headers, and the body; `TimeoutError` once it is spent.

    Not `urllib.request.urlopen(timeout=)`, which gives each socket operation the whole timeout,
    so a trickling endpoint never lets a read time out: measured with tests/jwks_server.py's
    trickle mode, a one-key JWKS (155 bytes) sent a byte every 0.05 s took 7.8 s to fetch with
    a 2 s timeout (at a byte a second, 155 s); this gives up at 2.0 s. Every socket operation
    here gets only what is left of the deadline, so the fetching thread ends at it too.
    `http.client.HTTPResponse` still parses the answer (Content-Length or chunked).

    Userinfo in the URL is sent as Basic credentials; `tls` defaults to the system's CAs.
    Redirects are not followed, and no proxy is used (urllib took one from HTTPS_PROXY). Name
    resolution is the resolver's, bounded by its own timeouts; `JwksCache` releases the requests
    waiting at the deadline regardless.
    """
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the JWKS URL must be http(s)://host/...")
    https = parts.scheme == "https"
    request = _request(parts)
    sock = _connect(parts.hostname, parts.port or (443 if https else 80), deadline)
    try:
        if https:
            # The handshake is one operation, bounded as a whole by the socket's timeout.
            sock.settimeout(_remaining(deadline))
            context = tls or _default_tls_context()
            sock = context.wrap_socket(sock, server_hostname=parts.hostname)
        sock.settimeout(_remaining(deadline))
        sock.sendall(request)  # bounded as a whole too (Python 3.5+)
        # HTTPResponse reads only through `makefile("rb")`: each read is given what is left.
        response = http.client.HTTPResponse(
            _DeadlineSocket(sock, deadline),  # type: ignore[arg-type]
            method="GET",
        )
        response.begin()
        if response.status != 200:
            raise UnexpectedStatus(response.status)
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
    finally:
        sock.close()
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
    return body


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the JWKS fetch took longer than JWKS_TIMEOUT_SECONDS")
    return left


def _request(parts: SplitResult) -> bytes:
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not target.isprintable() or " " in target:
        raise ValueError("the JWKS URL's path must not contain spaces or control characters")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {parts.netloc.rpartition('@')[2]}",
        "Accept: application/json",
        "User-Agent: todo-api",
        "Connection: close",
    ]
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        lines.append(f"Authorization: Basic {base64.b64encode(credentials).decode()}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    error: OSError = TimeoutError("the JWKS host has no address")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
        else:
            return sock
    raise error


@cache
def _default_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _DeadlineSocket:
    """The socket as `http.client.HTTPResponse` sees it: its reads bounded by the deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._sock.recv_into(buffer)


class JwksCache:
    def __init__(
        self,
        url: str,
        *,
        max_age: float,
        min_interval: float,
        timeout: float,
        stale_for: float = 0.0,
        fetch: Fetch = fetch_url,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._log_url = redacted_url(url)
        self._max_age = max_age
        self._trusted_for = max_age + stale_for
        self._min_interval = min_interval
        self._timeout = timeout
        self._fetch = fetch
        self._clock = clock
        # The keys of the last successful fetch and when it ended, replaced as one (the fetching
        # thread writes it, the event loop reads it).
        self._cached: tuple[dict[str, _PublicKey], float] = ({}, -math.inf)
        self._attempted_at = -math.inf  # last fetch, successful or not
        # One thread of our own does every fetch: requests waiting for keys await it and hold no
        # thread of the pool that runs the handlers. At most one fetch is submitted at a time,
        # so threads and queued fetches never pile up, even behind a fetch stuck past its
        # deadline (in the resolver, which no timeout reaches).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jwks-fetch")
        self._inflight: tuple[Future[None], float] | None = None  # the fetch and its deadline
        self._state = threading.Lock()  # guards _inflight/_attempted_at; never held over I/O

    def key_for(self, kid: object, algorithm: str, *, may_wait: bool = True) -> PyJWK:
        """The key to verify a token with this header's `kid` and `alg`, without any I/O.

        Raises `KeysOutdated` when only a fetch can tell and, `may_wait`, one is under way or
        allowed; otherwise `KeyRejected` (401) for a `kid` we do not hold, or `KeysUnavailable`
        (503) when no keys were ever fetched or the token's key is past the stale window."""
        if not isinstance(kid, str):
            raise KeyRejected("Token names no signing key (`kid`)")
        keys, fetched_at = self._cached
        now = self._clock()
        key = keys.get(kid)
        if key is not None and now - fetched_at < self._trusted_for:
            if now - fetched_at >= self._max_age:
                self._start_fetch()  # stale: refreshed in the background, nobody waits for it
            if algorithm not in key.algorithms:
                raise KeyRejected("Token algorithm does not match its signing key")
            return key.for_algorithm(algorithm)
        # A fetch under way counts as allowed: waiting for it (until its deadline) beats refusing
        # a token whose key is arriving.
        if may_wait and (
            self._inflight is not None or now - self._attempted_at >= self._min_interval
        ):
            raise KeysOutdated
        if key is not None or fetched_at == -math.inf:
            raise KeysUnavailable
        raise KeyRejected("Token signing key is unknown")

    async def refresh_async(self) -> None:
        """Wait for a fetch of the JWKS (the one under way, or a new one unless the last began
        less than `min_interval` ago) until it ends or its deadline passes, whichever is first.
        Never raises for a failed or late fetch (that keeps the keys).

        The wait is on a future of this event loop that the fetch's completion sets, not on
        `asyncio.wrap_future(fetch)`: timing that out would cancel the fetch itself were it
        still queued, and a fetch ending after its waiters' loop has closed (a test client's)
        would call back into the closed loop."""
        inflight = self._start_fetch()
        if inflight is None:
            return
        fetch, deadline = inflight
        remaining = deadline - self._clock()
        if remaining <= 0 or fetch.done():
            return
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def wake(_: Future[None]) -> None:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
                loop.call_soon_threadsafe(_set_done, ended)

        fetch.add_done_callback(wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended, remaining)

    def _start_fetch(self) -> tuple[Future[None], float] | None:
        """The fetch under way, else a new one if the interval allows, else None."""
        with self._state:
            if self._inflight is None:
                now = self._clock()
                if now - self._attempted_at < self._min_interval:
                    return None
                self._attempted_at = now
                fetch = self._executor.submit(self._fetch_and_store)
                self._inflight = (fetch, now + self._timeout)
            return self._inflight

    def _fetch_and_store(self) -> None:
        try:
            keys = parse_jwks(self._fetch(self.url, self._timeout))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # OSError covers refused connections, timeouts and error statuses, HTTPException a
            # garbled answer, ValueError bad JSON or shape.
            count_jwks_fetch("invalid" if isinstance(exc, ValueError) else "error")
            log.warning(
                "jwks.fetch_failed",
                url=self._log_url,
                error=type(exc).__name__,
                **({"status": exc.status} if isinstance(exc, UnexpectedStatus) else {}),
                cached_keys=len(self._cached[0]),
            )
        else:
            self._cached = (keys, self._clock())
            count_jwks_fetch("success")
            log.info("jwks.fetched", url=self._log_url, keys=len(keys))
        finally:
            with self._state:
                self._inflight = None


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
