"""Better Auth's public signing keys (its JWT plugin's JWKS): fetched off the event loop, cached,
refetched at most once per interval, and still served while the endpoint is down.

`key_for()` never does I/O; when only a fetch could answer it (a `kid` not seen yet, or keys
older than `max_age`) and a fetch is allowed, it raises `KeysOutdated` and the caller awaits
`refresh_async()` (the fetch runs in a thread of its own) before asking again. Fetches are
spaced by `min_interval` whatever happens, so a flood of forged `kid`s costs the JWKS endpoint
one request per interval, and a failed fetch keeps the keys we already hold.
"""

import asyncio
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import structlog
from jwt import PyJWK
from jwt.exceptions import PyJWTError

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
    """No key has ever been fetched, and the JWKS endpoint cannot be asked again yet."""


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


def fetch_url(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(  # noqa: S310 - settings allow only http(s) URLs
        url, headers={"Accept": "application/json", "User-Agent": "todo-api"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
    return body


class JwksCache:
    def __init__(
        self,
        url: str,
        *,
        max_age: float,
        min_interval: float,
        timeout: float,
        fetch: Fetch = fetch_url,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._max_age = max_age
        self._min_interval = min_interval
        self._timeout = timeout
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, _PublicKey] = {}
        self._fetched_at = -math.inf  # last successful fetch
        self._attempted_at = -math.inf  # last fetch, successful or not
        self._ever_fetched = False
        # One thread of our own does every fetch: requests waiting for keys await its future
        # and hold no thread of the pool that runs the handlers. A concurrent.futures.Future
        # (not an asyncio one) so that it can be awaited from any event loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jwks-fetch")
        self._inflight: Future[None] | None = None
        self._state = threading.Lock()  # guards _inflight/_attempted_at; never held over I/O

    def key_for(self, kid: object, algorithm: str) -> PyJWK:
        """The key to verify a token with this header's `kid` and `alg`, without any I/O."""
        if not isinstance(kid, str):
            raise KeyRejected("Token names no signing key (`kid`)")
        now = self._clock()
        # A fetch under way counts as allowed: waiting for it beats refusing a token whose key
        # is arriving.
        fetch_allowed = self._inflight is not None or now - self._attempted_at >= self._min_interval
        key = self._keys.get(kid)
        if key is None:
            if fetch_allowed:
                raise KeysOutdated
            if not self._ever_fetched:
                raise KeysUnavailable
            raise KeyRejected("Token signing key is unknown")
        if fetch_allowed and now - self._fetched_at >= self._max_age:
            raise KeysOutdated
        if algorithm not in key.algorithms:
            raise KeyRejected("Token algorithm does not match its signing key")
        return key.for_algorithm(algorithm)

    async def refresh_async(self) -> None:
        """Wait for a fetch of the JWKS: the one under way, or a new one unless the last began
        less than `min_interval` ago. Never raises for a failed fetch (that keeps the keys)."""
        with self._state:
            if self._inflight is None:
                if self._clock() - self._attempted_at < self._min_interval:
                    return
                self._attempted_at = self._clock()
                self._inflight = self._executor.submit(self._fetch_and_store)
            inflight = self._inflight
        await asyncio.wrap_future(inflight)

    def _fetch_and_store(self) -> None:
        try:
            keys = parse_jwks(self._fetch(self.url, self._timeout))
        except (OSError, urllib.error.URLError, ValueError) as exc:
            # OSError covers refused connections and timeouts, ValueError bad JSON or shape.
            count_jwks_fetch("invalid" if isinstance(exc, ValueError) else "error")
            log.warning(
                "jwks.fetch_failed",
                url=self.url,
                error=type(exc).__name__,
                cached_keys=len(self._keys),
            )
            return
        else:
            self._keys = keys
            self._fetched_at = self._clock()
            self._ever_fetched = True
            count_jwks_fetch("success")
            log.info("jwks.fetched", url=self.url, keys=len(keys))
        finally:
            with self._state:
                self._inflight = None
