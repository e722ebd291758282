"""Settings read from the environment (and `.env`), with safe defaults and loud refusals."""

import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The placeholder shipped in .env.example: copying the file without editing it must not start a
# service whose tokens anyone could forge.
EXAMPLE_SECRET = "replace-me-with-openssl-rand-base64-32-output"
MIN_SECRET_LENGTH = 32
# Likewise for the scrapers' token (the placeholder from the README's scrape configuration).
EXAMPLE_METRICS_TOKEN = "replace-me-with-openssl-rand-hex-32-output"
MIN_METRICS_TOKEN_LENGTH = 32
_TOKEN_CHARACTERS = re.compile(r"^[\x21-\x7e]+$")  # what fits a Bearer header unchanged
SUPPORTED_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
SUPPORTED_ASYMMETRIC_ALGORITHMS = ("EdDSA", "ES256", "ES384", "ES512", "RS256", "PS256")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _algorithm_list(setting: str, value: str, supported: tuple[str, ...]) -> str:
    """A comma-separated allow-list, normalised; refused unless every entry is supported."""
    algorithms = [a.strip() for a in value.split(",") if a.strip()]
    if not algorithms or any(a not in supported for a in algorithms):
        raise ValueError(f"{setting} must list only {', '.join(supported)}; got {value!r}")
    return ",".join(algorithms)


class HeaderLimits(BaseSettings):
    """The limits on a request's header block: the HTTP protocol reads these alone, once per
    process, before any app exists (a worker started by `--workers` builds its app later), so
    they must not depend on the rest of the settings being valid. `Settings` includes them."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    MAX_HEADER_BYTES: int = Field(
        default=16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Largest request line plus headers, in bytes (431 beyond; 400 for the line).",
    )
    MAX_HEADER_FIELDS: int = Field(
        default=100, ge=1, le=10_000, description="Most header fields in a request (431 beyond)."
    )
    HEADER_TIMEOUT_SECONDS: float = Field(
        default=10,
        gt=0,
        le=600,
        description="Seconds a client may take to send a request's headers (408 beyond), and "
        "that a new connection may stay silent.",
    )
    BODY_TIMEOUT_SECONDS: float = Field(
        default=30,
        gt=0,
        le=3600,
        description="Seconds a client may take to send a request's body once its headers are in "
        "(408 beyond; the connection just closed if an answer has already gone out).",
    )


@lru_cache
def get_header_limits() -> HeaderLimits:
    return HeaderLimits()


class Settings(HeaderLimits):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    DATABASE_URL: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        description="PostgreSQL URL the requests use, pooled (Neon's -pooler host) or direct.",
    )
    # Neon and Vercel's names: DATABASE_URL is the pooled endpoint (PgBouncer in transaction
    # mode), DATABASE_URL_UNPOOLED the direct one, for what needs a session of its own.
    DATABASE_URL_UNPOOLED: str = Field(
        default="",
        description="Direct (unpooled) URL for migrations and session work; default DATABASE_URL.",
    )
    DB_MIGRATE_ON_START: bool = Field(
        default=True,
        description="Upgrade the schema to head at start-up; off: refuse to start if behind.",
    )
    BETTER_AUTH_SECRET: str = Field(
        default="", description="Shared with Better Auth; verifies HS256 tokens. 32+ characters."
    )
    JWT_ALGORITHMS: str = Field(
        default="HS256", description="Comma-separated allow-list of HMAC algorithms."
    )
    JWT_LEEWAY_SECONDS: int = Field(default=30, ge=0, le=300)
    # Better Auth's JWT plugin: tokens signed with the keys published at its JWKS endpoint.
    BETTER_AUTH_URL: str = Field(
        default="",
        description="Better Auth's base URL; enables its JWT plugin's tokens (iss/aud = it).",
    )
    JWT_JWKS_URL: str = Field(
        default="", description="The JWKS; default {BETTER_AUTH_URL}/api/auth/jwks."
    )
    JWT_ISSUER: str = Field(default="", description="Expected `iss`; default BETTER_AUTH_URL.")
    JWT_AUDIENCE: str = Field(default="", description="Expected `aud`; default BETTER_AUTH_URL.")
    JWT_JWKS_ALGORITHMS: str = Field(
        default="EdDSA,ES256,ES512,RS256,PS256",
        description="Comma-separated allow-list of asymmetric algorithms for JWKS tokens.",
    )
    JWKS_CACHE_SECONDS: float = Field(
        default=600, ge=1, le=86_400, description="Seconds the JWKS keys are used before a refetch."
    )
    JWKS_STALE_SECONDS: float = Field(
        default=3600,
        ge=0,
        le=7 * 86_400,
        description=(
            "Seconds past JWKS_CACHE_SECONDS that a held key still verifies its tokens while "
            "refetches fail or are under way (refetched in the background, nobody waits); "
            "after that the endpoint must answer, else JWKS tokens get 503."
        ),
    )
    JWKS_REFETCH_INTERVAL_SECONDS: float = Field(
        default=30, ge=1, le=3600, description="Least seconds between two JWKS fetches."
    )
    JWKS_TIMEOUT_SECONDS: float = Field(
        default=5,
        gt=0,
        le=60,
        description="Deadline of a whole JWKS fetch (connect, TLS, headers, body); the longest "
        "a request waits for keys.",
    )
    AUTH_USER_TABLE: str = Field(default="user", description="Better Auth's users table.")

    CORS_ORIGINS: str = Field(default="http://localhost:3000")

    # Overflow connections are closed as soon as they are returned to a full pool, so under
    # steady load above DB_POOL_SIZE requests each would open a new one (a PostgreSQL backend
    # started per few requests). The pool is sized for the load instead, with no overflow.
    # 16 rather than more: on a database of a few cores, more statements at once only queue
    # on its CPU and WAL locks, where a request waits longer and less fairly than in the
    # service's own first-come queue. Against 20, the writes' p99 at 32 clients came down to
    # the raw-driver ceiling's (which uses 16) and throughput did not move.
    DB_POOL_SIZE: int = Field(default=16, ge=1, le=200)
    DB_MAX_OVERFLOW: int = Field(default=0, ge=0, le=200)
    DB_POOL_TIMEOUT_SECONDS: float = Field(default=5.0, gt=0, le=60)
    DB_POOL_RECYCLE_SECONDS: int = Field(default=240, ge=1, lt=300)
    DB_CONNECT_TIMEOUT_SECONDS: int = Field(default=5, ge=1, le=60)
    DB_STATEMENT_TIMEOUT_MS: int = Field(default=5000, ge=100, le=600_000)
    DB_STARTUP_WAIT_SECONDS: float = Field(default=30.0, ge=0, le=600)
    DB_PREPARED_STATEMENTS: bool = Field(
        default=True,
        description="Prepare each statement once per server connection (SQL PREPARE, which "
        "works through any pooler); false sends every statement as text, parsed and planned "
        "on each call.",
    )

    MAX_BODY_BYTES: int = Field(default=64 * 1024, ge=1024, le=10 * 1024 * 1024)
    # What a chunk holds the event loop for grows with it: reading, validating and encoding
    # tasks of about 1.2 KB took 6 ms of CPU a chunk at 500 rows, 13 at 1,000, 26 at 2,000,
    # while a whole 150,000-task list took 1.6-1.9 s of CPU at any size from 100 to 2,000. At
    # 500, eight long lists at once still keep another request waiting at most ~50 ms.
    LIST_CHUNK_ROWS: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="Rows a list reads and sends at a time; a longer list is streamed in chunks.",
    )

    METRICS_TOKEN: str = Field(
        default="",
        description="Bearer token for GET /metrics (Prometheus); empty: no /metrics at all.",
    )

    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    LOG_FORMAT: Literal["json", "console", "auto"] = "auto"

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("BETTER_AUTH_SECRET")
    @classmethod
    def _secret_is_strong(cls, value: str) -> str:
        if not value:
            raise ValueError(
                "BETTER_AUTH_SECRET is not set: it must be the same secret as the Better Auth "
                "server's (generate one with `openssl rand -base64 32`)"
            )
        if value == EXAMPLE_SECRET:
            raise ValueError("BETTER_AUTH_SECRET is still the placeholder from .env.example")
        if len(value) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"BETTER_AUTH_SECRET is {len(value)} characters; at least {MIN_SECRET_LENGTH} "
                "are required so that tokens cannot be brute-forced"
            )
        return value

    @field_validator("METRICS_TOKEN")
    @classmethod
    def _metrics_token_is_strong(cls, value: str) -> str:
        if not value:
            return value  # metrics are off
        if value == EXAMPLE_METRICS_TOKEN:
            raise ValueError("METRICS_TOKEN is still the placeholder from the README")
        if not _TOKEN_CHARACTERS.match(value):
            raise ValueError(
                "METRICS_TOKEN may hold only printable ASCII without spaces (it is sent as "
                "`Authorization: Bearer <METRICS_TOKEN>`)"
            )
        if len(value) < MIN_METRICS_TOKEN_LENGTH:
            raise ValueError(
                f"METRICS_TOKEN is {len(value)} characters; at least "
                f"{MIN_METRICS_TOKEN_LENGTH} are required (generate one with "
                "`openssl rand -hex 32`)"
            )
        return value

    @model_validator(mode="after")
    def _metrics_token_is_not_the_secret(self) -> "Settings":
        if self.METRICS_TOKEN and self.METRICS_TOKEN == self.BETTER_AUTH_SECRET:
            raise ValueError(
                "METRICS_TOKEN may not be BETTER_AUTH_SECRET: a scraper's configuration would "
                "then hold the key that signs every user's tokens"
            )
        return self

    @field_validator("JWT_ALGORITHMS")
    @classmethod
    def _algorithms_are_hmac(cls, value: str) -> str:
        return _algorithm_list("JWT_ALGORITHMS", value, SUPPORTED_HMAC_ALGORITHMS)

    @field_validator("JWT_JWKS_ALGORITHMS")
    @classmethod
    def _algorithms_are_asymmetric(cls, value: str) -> str:
        return _algorithm_list("JWT_JWKS_ALGORITHMS", value, SUPPORTED_ASYMMETRIC_ALGORITHMS)

    @field_validator("BETTER_AUTH_URL", "JWT_JWKS_URL")
    @classmethod
    def _url_is_http(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _jwks_tokens_are_bound(self) -> "Settings":
        if self.jwks_url and not (self.jwt_issuer and self.jwt_audience):
            raise ValueError(
                "JWT_JWKS_URL is set without BETTER_AUTH_URL: set BETTER_AUTH_URL (or both "
                "JWT_ISSUER and JWT_AUDIENCE) so that the tokens' iss and aud can be checked"
            )
        return self

    @field_validator("AUTH_USER_TABLE")
    @classmethod
    def _table_is_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(f"AUTH_USER_TABLE {value!r} is not a plain SQL identifier")
        return value

    @field_validator("DATABASE_URL", "DATABASE_URL_UNPOOLED")
    @classmethod
    def _database_url_is_postgres(cls, value: str, info: ValidationInfo) -> str:
        if info.field_name == "DATABASE_URL_UNPOOLED" and not value:
            return value
        if not value.startswith(("postgres://", "postgresql://", "postgresql+psycopg2://")):
            raise ValueError(f"{info.field_name} must be a postgres:// or postgresql:// URL")
        root_certificate = _query_parameter(value, "sslrootcert")
        if root_certificate and root_certificate != "system":
            if not Path(root_certificate).is_file():
                raise ValueError(
                    f"{info.field_name} names sslrootcert={root_certificate}, which does not "
                    "exist (or is not a file): give the path of the CA certificate that signed "
                    "the server's, as this process sees it"
                )
        return value

    @model_validator(mode="after")
    def _origins_are_explicit(self) -> "Settings":
        if "*" in self.cors_origins:
            raise ValueError(
                "CORS_ORIGINS may not be '*': the API takes bearer tokens, list the frontend's "
                "origins explicitly"
            )
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The URL for SQLAlchemy's psycopg2 dialect (Heroku/Neon style postgres:// included)."""
        return _psycopg2_url(self.DATABASE_URL)

    @property
    def unpooled_url(self) -> str:
        """The direct URL: DATABASE_URL_UNPOOLED, or DATABASE_URL when it is not set."""
        return self.DATABASE_URL_UNPOOLED or self.DATABASE_URL

    @property
    def sqlalchemy_unpooled_url(self) -> str:
        """`unpooled_url` for SQLAlchemy: what migrations and session-level work connect to."""
        return _psycopg2_url(self.unpooled_url)

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.CORS_ORIGINS.split(",") if o.strip()]

    @property
    def jwt_algorithms(self) -> list[str]:
        return self.JWT_ALGORITHMS.split(",")

    @property
    def jwks_url(self) -> str:
        """Empty when JWKS tokens are off (neither JWT_JWKS_URL nor BETTER_AUTH_URL is set)."""
        if self.JWT_JWKS_URL:
            return self.JWT_JWKS_URL
        return f"{self.BETTER_AUTH_URL.rstrip('/')}/api/auth/jwks" if self.BETTER_AUTH_URL else ""

    @property
    def jwt_issuer(self) -> str:
        return self.JWT_ISSUER or self.BETTER_AUTH_URL

    @property
    def jwt_audience(self) -> str:
        return self.JWT_AUDIENCE or self.BETTER_AUTH_URL

    @property
    def jwt_jwks_algorithms(self) -> list[str]:
        return self.JWT_JWKS_ALGORITHMS.split(",")

    @property
    def json_logs(self) -> bool:
        if self.LOG_FORMAT == "auto":
            return not sys.stdout.isatty()
        return self.LOG_FORMAT == "json"


def _psycopg2_url(url: str) -> str:
    _scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}"


def _query_parameter(url: str, name: str) -> str | None:
    values = parse_qs(urlsplit(url).query).get(name)
    return values[-1] if values else None


@lru_cache
def get_settings() -> Settings:
    return Settings()
