"""Who is calling: bearer-token verification, the `CurrentUser` dependency, auth-failure logging.

Order of checks for every task route, before the body is even read:
1. an `Authorization: Bearer <token>` header (401 missing_token / invalid_scheme),
2. a well-formed JWT signed with an allowed algorithm and our key (401 malformed_token,
   bad_signature), with valid `exp`/`nbf`/`iat` (401 expired, not_yet_valid) and a non-empty
   string `sub` (401 invalid_claims),
3. `sub` equal to the `{user_id}` in the path (403 user_mismatch).
Each failure is logged once as `auth.failed` with its reason and never any part of the token.
"""

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import jwt
import structlog
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from jwt.exceptions import InvalidSubjectError

from backend.platform.config import Settings
from backend.platform.jwks import JwksCache, KeyRejected, KeysOutdated, KeysUnavailable
from backend.platform.telemetry.metrics import count_auth_failure

log = structlog.get_logger("backend.auth")

VERIFIED_TOKENS_MAX = 4096

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="BetterAuthJWT",
    bearerFormat="JWT",
    description=(
        "A JWT for the user from Better Auth: HS256 signed with BETTER_AUTH_SECRET (`sub` = user "
        "id, or Better Auth's cookie-cache JWT), or its JWT plugin's token (EdDSA by default, "
        "verified against its JWKS) when the service has BETTER_AUTH_URL."
    ),
)


@dataclass(frozen=True, slots=True)
class AuthUser:
    id: str


class AuthError(Exception):
    """A request that is not allowed through; `reason` is what operators see in the log."""

    def __init__(self, reason: str, detail: str, status_code: int = status.HTTP_401_UNAUTHORIZED):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status_code = status_code


class UnknownUserError(Exception):
    """A valid token for a user that the users table does not hold (deleted, or never synced)."""


class TokenVerifier:
    """Verifies bearer tokens against the configured secret and algorithm allow-list."""

    def __init__(self, settings: Settings) -> None:
        self._secret = settings.BETTER_AUTH_SECRET
        self._algorithms = settings.jwt_algorithms
        self._leeway = settings.JWT_LEEWAY_SECONDS
        # `sub` is checked after decoding: Better Auth's cookie-cache JWT carries none.
        self._options: Any = {"require": ["exp"], "verify_sub": True}
        self._jwks: JwksCache | None = None
        self._jwks_algorithms: tuple[str, ...] = ()  # a tuple: `alg` may be unhashable JSON
        if settings.jwks_url:
            self._jwks = JwksCache(
                settings.jwks_url,
                max_age=settings.JWKS_CACHE_SECONDS,
                min_interval=settings.JWKS_REFETCH_INTERVAL_SECONDS,
                timeout=settings.JWKS_TIMEOUT_SECONDS,
                stale_for=settings.JWKS_STALE_SECONDS,
            )
            self._jwks_algorithms = tuple(settings.jwt_jwks_algorithms)
        self._jwks_options: Any = {"require": ["exp", "sub", "iss", "aud"], "verify_sub": True}
        self._issuer = _with_and_without_slash(settings.jwt_issuer)
        self._audience = _with_and_without_slash(settings.jwt_audience)
        # Tokens signed with the secret and already verified, each with its user and the time it
        # expires (exp + leeway). A frontend sends the same token with every request until it
        # expires, and decoding it again was the largest single cost of a request (see the
        # README's Performance section). Looked up by the exact token string; JWKS tokens are
        # not kept (their key can be withdrawn before they expire); bounded, oldest out first.
        self._verified: dict[str, tuple[str, float]] = {}

    @property
    def jwks(self) -> JwksCache | None:
        return self._jwks

    def verify(self, token: str, *, may_wait_for_keys: bool = True) -> str:
        """Return the user id the token was issued for, or raise AuthError (or, for a JWKS
        token, KeysOutdated when `may_wait_for_keys` and only a fetch can tell, KeysUnavailable
        when no key may be trusted)."""
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known[1]:
                return known[0]
            del self._verified[token]  # expired: verified again below, and refused
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise AuthError("malformed_token", "Malformed token") from exc
        except jwt.InvalidTokenError as exc:
            # PyJWT refuses a non-string `kid` and any `crit` extension it does not implement
            # here, before the signature; unhandled, these were 500s.
            raise AuthError("invalid_claims", "Token header is not acceptable") from exc
        algorithm = header.get("alg")
        # Never mixing families: HS* only against the secret, the others only against a JWKS
        # key published for exactly that algorithm (so HS256 "signed" with a public key fails).
        asymmetric = algorithm in self._jwks_algorithms
        if algorithm not in self._algorithms and not asymmetric:
            # Covers `none` in any case and every algorithm we do not hold a key for.
            raise AuthError("bad_signature", "Token signature algorithm is not accepted")
        if "crit" in header:
            # RFC 7515 4.1.11: extensions we do not understand must make the token invalid.
            raise AuthError("invalid_claims", "Token requires unsupported extensions")
        try:
            if asymmetric:
                claims = self._decode_jwks_token(token, header, may_wait_for_keys)
            else:
                claims = jwt.decode(
                    token,
                    self._secret,
                    algorithms=self._algorithms,
                    options=self._options,
                    leeway=self._leeway,
                )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("expired", "Token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthError("not_yet_valid", "Token is not valid yet") from exc
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError) as exc:
            raise AuthError("bad_signature", "Token signature is invalid") from exc
        except (jwt.MissingRequiredClaimError, InvalidSubjectError) as exc:
            raise AuthError("invalid_claims", "Token lacks a valid subject or expiry") from exc
        except jwt.DecodeError as exc:
            raise AuthError("malformed_token", "Malformed token") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError("invalid_claims", "Token claims are invalid") from exc
        if any(not _is_numeric_date(claims[name]) for name in _TIME_CLAIMS if name in claims):
            # PyJWT takes int() of these, so `"exp": "9999999999"` would pass; RFC 7519 says
            # NumericDate, a JSON number.
            raise AuthError("invalid_claims", "Token time claims must be numbers")
        subject = claims.get("sub")
        if subject is None and not asymmetric:
            return self._cookie_cache_user(claims)
        if not isinstance(subject, str) or not subject.strip():
            raise AuthError("invalid_claims", "Token lacks a valid subject or expiry")
        if not asymmetric:
            self._remember(token, subject, int(claims["exp"]))  # PyJWT's int() of it too
        return subject

    def _remember(self, token: str, subject: str, expires_at: float) -> None:
        if len(self._verified) >= VERIFIED_TOKENS_MAX:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (subject, expires_at + self._leeway)

    def _decode_jwks_token(
        self, token: str, header: dict[str, Any], may_wait_for_keys: bool
    ) -> dict[str, Any]:
        assert self._jwks is not None
        try:
            key = self._jwks.key_for(header.get("kid"), header["alg"], may_wait=may_wait_for_keys)
        except KeyRejected as exc:
            raise AuthError("bad_signature", str(exc)) from exc
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[header["alg"]],
            options=self._jwks_options,
            leeway=self._leeway,
            issuer=self._issuer,
            audience=self._audience,
        )
        return claims

    def _cookie_cache_user(self, claims: dict[str, Any]) -> str:
        """The user of Better Auth's cookie cache as a JWT (`session.cookieCache.strategy:
        "jwt"`, the `better-auth.session_data` cookie): HS256 with the secret, no `sub`, and
        `{"session": {"userId", "expiresAt", ...}, "user": {"id", ...}, "updatedAt", "exp"}`.
        Only that exact shape names a user; its session must not have ended either."""
        session, user = claims.get("session"), claims.get("user")
        if not isinstance(session, dict) or not isinstance(user, dict):
            raise AuthError("invalid_claims", "Token lacks a valid subject or expiry")
        user_id = user.get("id")
        if (
            not isinstance(user_id, str)
            or not user_id.strip()
            or session.get("userId") != user_id
            or not _is_numeric_date(claims.get("updatedAt"))
        ):
            raise AuthError("invalid_claims", "Token lacks a valid subject or expiry")
        expires_at = _instant(session.get("expiresAt"))
        if expires_at is None:
            raise AuthError("invalid_claims", "Token's session has no valid expiry")
        if expires_at + self._leeway <= datetime.now(UTC).timestamp():
            raise AuthError("expired", "Token's session has expired")
        return user_id


def _with_and_without_slash(url: str) -> list[str]:
    base = url.rstrip("/")
    return [base, base + "/"]


def _instant(value: object) -> float | None:
    """A Better Auth date as JSON: an ISO 8601 string (`Date.toJSON()`) or epoch milliseconds."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        if moment.tzinfo is None:
            return None
        return moment.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1000
    return None


_TIME_CLAIMS = ("exp", "nbf", "iat")


def _is_numeric_date(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bearer_token(request: Request) -> str:
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        # Proxies and frameworks disagree on which of several wins (Starlette takes the first):
        # a request carrying two credentials is refused, not judged by one of them.
        raise AuthError("malformed_token", "Send exactly one Authorization header")
    header = values[0] if values else None
    if header is None or not header.strip():
        raise AuthError("missing_token", "Not authenticated")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("invalid_scheme", "Authorization scheme must be Bearer")
    token = token.strip()
    if not token:
        raise AuthError("missing_token", "Not authenticated")
    return token


async def _verify(verifier: TokenVerifier, token: str) -> str:
    """`verify()`, after waiting for at most one JWKS fetch (and no longer than its deadline,
    JWKS_TIMEOUT_SECONDS) when only a fetch can tell; then decided with the keys we hold."""
    try:
        return verifier.verify(token)
    except KeysOutdated:
        assert verifier.jwks is not None
        await verifier.jwks.refresh_async()
    return verifier.verify(token, may_wait_for_keys=False)


async def authenticate(request: Request) -> AuthUser:
    """Verify the request's token and that it belongs to the path's user, and keep the user on
    the request (`AuthenticatedRoute` calls this once, before anything else runs)."""
    try:
        verifier: TokenVerifier = request.app.state.token_verifier
        user_id = await _verify(verifier, _bearer_token(request))
        if user_id != request.path_params.get("user_id"):
            raise AuthError(
                "user_mismatch",
                "This token does not grant access to another user's tasks",
                status.HTTP_403_FORBIDDEN,
            )
    except AuthError as exc:
        log.warning("auth.failed", reason=exc.reason, status=exc.status_code)
        count_auth_failure(exc.reason)
        headers = None
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            # RFC 6750 3.1: no error code when the request carried no bearer token at all.
            no_token = exc.reason in ("missing_token", "invalid_scheme")
            challenge = "Bearer" if no_token else 'Bearer error="invalid_token"'
            headers = {"WWW-Authenticate": challenge}
        raise HTTPException(exc.status_code, exc.detail, headers=headers) from None
    except KeysUnavailable:
        # Not the token's fault: the keys were never fetched, or the token's key was fetched
        # longer ago than JWKS_CACHE_SECONDS + JWKS_STALE_SECONDS, and the endpoint is down.
        log.warning("jwks.unavailable", status=503)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "The signing keys cannot be fetched; please retry shortly",
            headers={"Retry-After": "5"},
        ) from None
    user = AuthUser(id=user_id)
    request.state.auth_user = user
    structlog.contextvars.bind_contextvars(user_id=user_id)
    return user


async def get_current_user(request: Request) -> AuthUser:
    """The user `AuthenticatedRoute` verified for this request.

    Its only parameter is the request: each parameter or sub-dependency FastAPI resolves costs
    every request a few percent of its CPU (measured: the path's `user_id` 2.8%, a
    `Security(bearer_scheme)` sub-dependency 3.9%), so both are documented in the OpenAPI
    schema by `AuthenticatedRoute` instead of being declared here."""
    user = getattr(request.state, "auth_user", None)
    if user is None:  # a route that is not an AuthenticatedRoute: verify here
        user = await authenticate(request)
    return user  # type: ignore[no-any-return]


CurrentUser = Annotated[AuthUser, Depends(get_current_user)]

# How every task route's `{user_id}` and bearer token appear in the OpenAPI schema.
_USER_ID_DESCRIPTION = "The signed-in user's id: the token's `sub`."
USER_ID_PARAMETER = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "description": _USER_ID_DESCRIPTION,
    "schema": {"type": "string", "title": "User Id", "description": _USER_ID_DESCRIPTION},
}
BEARER_SECURITY: dict[str, list[str]] = {bearer_scheme.scheme_name: []}


class AuthenticatedRoute(APIRoute):
    """Authenticates before FastAPI reads the body, so a bad token is a 401 even when the body
    is malformed JSON (FastAPI parses the body before it resolves any dependency).

    It also documents, per operation, the path's `{user_id}` and the bearer token it checks;
    `document_bearer_auth(app)` adds the token's scheme to the schema's components."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        extra = dict(kwargs.pop("openapi_extra", None) or {})
        extra["parameters"] = [*extra.get("parameters", []), USER_ID_PARAMETER]
        extra["security"] = [*extra.get("security", []), BEARER_SECURITY]
        super().__init__(path, endpoint, openapi_extra=extra, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        check_path = self.check_path_params

        async def authenticate_then_handle(request: Request) -> Response:
            await authenticate(request)
            check_path(request.path_params)
            return await handler(request)

        return authenticate_then_handle

    def check_path_params(self, path_params: dict[str, Any]) -> None:
        """For subclasses: refuse a request by its path (by raising), after authentication and
        before the body is read. Cheaper than a dependency, which FastAPI resolves only after
        reading the body."""


def document_bearer_auth(app: FastAPI) -> None:
    """Name `bearer_scheme` in the app's OpenAPI components, for the routes' `security`."""
    build_schema = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build_schema()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[bearer_scheme.scheme_name] = bearer_scheme.model.model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
