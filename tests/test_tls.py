"""TLS, which Neon requires: sslmode=require, and verify-full with the CA given in sslrootcert,
against a PostgreSQL of our own that takes only TLS connections (tests/tls_server.py)."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from backend.main import create_app
from backend.platform.config import Settings
from backend.platform.db import build_engine
from backend.platform.db.reachable import DatabaseUnreachable, refuse_unless_reachable
from tests.tls_server import TlsPostgres, tls_postgres


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsPostgres]:
    with tls_postgres() as server:
        yield server


def tls_settings(settings: Settings, **overrides: object) -> Settings:
    return settings.model_copy(
        update={"DB_STARTUP_WAIT_SECONDS": 0.5, "DB_CONNECT_TIMEOUT_SECONDS": 2, **overrides}
    )


def served_over_tls(settings: Settings) -> bool:
    """Whether the service's own connection is encrypted, asked of the server."""
    engine = build_engine(settings, autocommit=True)
    try:
        with engine.connect() as connection:
            return bool(
                connection.execute(
                    text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_the_server_takes_only_tls(tls_server: TlsPostgres, settings: Settings) -> None:
    """So that the tests below pass only if TLS is in use."""
    with pytest.raises(DatabaseUnreachable, match="no encryption"):
        refuse_unless_reachable(
            tls_settings(settings, DATABASE_URL_UNPOOLED=tls_server.url("sslmode=disable"))
        )


def test_sslmode_require_serves_requests(tls_server: TlsPostgres, settings: Settings) -> None:
    service_settings = tls_settings(settings, DATABASE_URL=tls_server.url("sslmode=require"))
    assert served_over_tls(service_settings)
    with TestClient(create_app(service_settings)) as client:  # start-up included
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_sslmode_verify_full_with_the_servers_ca_serves_requests(
    tls_server: TlsPostgres, settings: Settings, host: str
) -> None:
    url = tls_server.url(f"sslmode=verify-full&sslrootcert={tls_server.ca_file}", host=host)
    service_settings = tls_settings(settings, DATABASE_URL=url, DATABASE_URL_UNPOOLED=url)
    refuse_unless_reachable(service_settings)  # no refusal
    assert served_over_tls(service_settings)
    with TestClient(create_app(service_settings)) as client:
        assert client.get("/health").status_code == 200


def test_sslmode_verify_full_with_another_ca_is_refused_at_start(
    tls_server: TlsPostgres, settings: Settings
) -> None:
    url = tls_server.url(f"sslmode=verify-full&sslrootcert={tls_server.other_ca_file}")
    with pytest.raises(DatabaseUnreachable) as refused:
        refuse_unless_reachable(tls_settings(settings, DATABASE_URL_UNPOOLED=url))
    assert str(refused.value).startswith("DATABASE_URL_UNPOOLED (postgresql://127.0.0.1")
    assert "certificate verify failed" in str(refused.value)
