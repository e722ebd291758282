"""Who is calling: bearer-token verification, the `CurrentUser` dependency, auth-failure logging.

Order of checks for every task route, before the body is even read:
1. an `Authorization: Bearer <token>` header (401 missing_token / invalid_scheme),
2. a well-formed JWT signed with an allowed algorithm and our key (401 malformed_token,
   bad_signature), with valid `exp`/`nbf`/`iat` (401 expired, not_yet_valid) and a non-empty
   string `sub` (401 invalid_claims),
3. `sub` equal to the `{user_id}` in the path (403 user_mismatch).
Each failure is logged once as `auth.failed` with its reason and never any part of the token.
"""

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
import structlog
from fastapi import Depends, HTTPException, Path, Request, Response, Security, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jwt.exceptions import InvalidSubjectError

from backend.platform.config import Settings

log = structlog.get_logger("backend.auth")

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="BetterAuthJWT",
    bearerFormat="JWT",
    description="A JWT for the user, from Better Auth (HS256 signed with BETTER_AUTH_SECRET).",
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
        self._options: Any = {"require": ["exp", "sub"], "verify_sub": True}

    def verify(self, token: str) -> str:
        """Return the user id the token was issued for, or raise AuthError."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise AuthError("malformed_token", "Malformed token") from exc
        except jwt.InvalidTokenError as exc:
            # PyJWT refuses a non-string `kid` and any `crit` extension it does not implement
            # here, before the signature; unhandled, these were 500s.
            raise AuthError("invalid_claims", "Token header is not acceptable") from exc
        if header.get("alg") not in self._algorithms:
            # Covers `none` in any case and every algorithm we do not hold a key for.
            raise AuthError("bad_signature", "Token signature algorithm is not accepted")
        if "crit" in header:
            # RFC 7515 4.1.11: extensions we do not understand must make the token invalid.
            raise AuthError("invalid_claims", "Token requires unsupported extensions")
        try:
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
        if not isinstance(subject, str) or not subject.strip():
            raise AuthError("invalid_claims", "Token lacks a valid subject or expiry")
        return subject


_TIME_CLAIMS = ("exp", "nbf", "iat")


def _is_numeric_date(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        raise AuthError("missing_token", "Not authenticated")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("invalid_scheme", "Authorization scheme must be Bearer")
    token = token.strip()
    if not token:
        raise AuthError("missing_token", "Not authenticated")
    return token


def authenticate(request: Request) -> AuthUser:
    """Verify the request's token and that it belongs to the path's user; cached per request."""
    cached = getattr(request.state, "auth_user", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    try:
        verifier: TokenVerifier = request.app.state.token_verifier
        user_id = verifier.verify(_bearer_token(request))
        if user_id != request.path_params.get("user_id"):
            raise AuthError(
                "user_mismatch",
                "This token does not grant access to another user's tasks",
                status.HTTP_403_FORBIDDEN,
            )
    except AuthError as exc:
        log.warning("auth.failed", reason=exc.reason, status=exc.status_code)
        headers = None
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            # RFC 6750 3.1: no error code when the request carried no bearer token at all.
            no_token = exc.reason in ("missing_token", "invalid_scheme")
            challenge = "Bearer" if no_token else 'Bearer error="invalid_token"'
            headers = {"WWW-Authenticate": challenge}
        raise HTTPException(exc.status_code, exc.detail, headers=headers) from None
    user = AuthUser(id=user_id)
    request.state.auth_user = user
    structlog.contextvars.bind_contextvars(user_id=user_id)
    return user


async def get_current_user(
    request: Request,
    user_id: Annotated[str, Path(description="The signed-in user's id: the token's `sub`.")],
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> AuthUser:
    """Async on purpose: verifying an HMAC is cheap and needs no thread-pool hop."""
    return authenticate(request)


CurrentUser = Annotated[AuthUser, Depends(get_current_user)]


class AuthenticatedRoute(APIRoute):
    """Authenticates before FastAPI reads the body, so a bad token is a 401 even when the body
    is malformed JSON (FastAPI parses the body before it resolves any dependency)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def authenticate_then_handle(request: Request) -> Response:
            authenticate(request)
            return await handler(request)

        return authenticate_then_handle
