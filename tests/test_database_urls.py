"""The two database URLs as Neon and Vercel name them, and the refusals at start when one of
them is wrong: a message and exit status 2, never a hang or a traceback."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from backend.platform.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
POOLED = (
    "postgresql://alex:pw@ep-cool-1234-pooler.eu-central-1.aws.neon.tech/neondb?sslmode=require"
)
DIRECT = "postgresql://alex:pw@ep-cool-1234.eu-central-1.aws.neon.tech/neondb?sslmode=require"


def make_settings(**values: object) -> Settings:
    return Settings(_env_file=None, BETTER_AUTH_SECRET=SECRET, **values)  # type: ignore[call-arg]


def test_the_unpooled_url_is_the_direct_one_when_given() -> None:
    settings = make_settings(DATABASE_URL=POOLED, DATABASE_URL_UNPOOLED=DIRECT)
    assert settings.sqlalchemy_url == POOLED.replace("postgresql://", "postgresql+psycopg2://")
    assert settings.unpooled_url == DIRECT
    assert settings.sqlalchemy_unpooled_url == DIRECT.replace(
        "postgresql://", "postgresql+psycopg2://"
    )


def test_without_an_unpooled_url_everything_uses_database_url() -> None:
    settings = make_settings(DATABASE_URL=POOLED)
    assert settings.DATABASE_URL_UNPOOLED == ""
    assert settings.unpooled_url == POOLED
    assert settings.sqlalchemy_unpooled_url == settings.sqlalchemy_url


@pytest.mark.parametrize("setting", ["DATABASE_URL", "DATABASE_URL_UNPOOLED"])
def test_an_unpooled_url_must_be_postgres_too(setting: str) -> None:
    with pytest.raises(ValidationError, match=f"{setting} must be a postgres://"):
        make_settings(**{setting: "mysql://x@h/db"})


@pytest.mark.parametrize("setting", ["DATABASE_URL", "DATABASE_URL_UNPOOLED"])
def test_a_sslrootcert_that_does_not_exist_is_refused(setting: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(ValidationError, match=f"{setting} names sslrootcert={missing}, which"):
        make_settings(**{setting: f"{DIRECT}&sslmode=verify-full&sslrootcert={missing}"})
    present = tmp_path / "ca.pem"
    present.write_text("-----BEGIN CERTIFICATE-----\n")
    make_settings(**{setting: f"{DIRECT}&sslmode=verify-full&sslrootcert={present}"})
    make_settings(**{setting: f"{DIRECT}&sslmode=verify-full&sslrootcert=system"})


def start_from_environment(tmp_path: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    """What `uvicorn backend.main:app` does first: build the app from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_"))}
    return subprocess.run(
        [sys.executable, "-c", "import backend.main; backend.main.app"],
        cwd=tmp_path,  # no .env there
        env={**env, "PYTHONPATH": str(ROOT), "BETTER_AUTH_SECRET": SECRET, **environment},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_service_refuses_to_start_with_a_sslrootcert_that_does_not_exist(tmp_path: Path) -> None:
    result = start_from_environment(
        tmp_path, DATABASE_URL=f"{DIRECT}&sslmode=verify-full&sslrootcert=/nowhere/ca.pem"
    )
    assert result.returncode == 2
    assert "Refusing to start" in result.stderr
    assert "DATABASE_URL names sslrootcert=/nowhere/ca.pem, which does not exist" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_service_refuses_to_start_when_the_unpooled_url_cannot_be_reached(
    tmp_path: Path, database_url: str
) -> None:
    started = time.monotonic()
    result = start_from_environment(
        tmp_path,
        DATABASE_URL=database_url,
        DATABASE_URL_UNPOOLED="postgresql://postgres:secret@127.0.0.1:1/postgres",
        DB_STARTUP_WAIT_SECONDS="1",
    )
    assert result.returncode == 2
    assert time.monotonic() - started < 30
    refusal = result.stderr.strip().splitlines()[-1]
    assert refusal.startswith(
        "Refusing to start: DATABASE_URL_UNPOOLED (postgresql://127.0.0.1:1/postgres)"
        " cannot be reached: connection to server at"
    )
    assert "secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
