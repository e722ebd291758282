"""The verifier remembers HS256 tokens it has verified, until they expire, and nothing else."""

import time
from typing import Any

import jwt
import pytest

from backend.platform import auth
from backend.platform.auth import AuthError, TokenVerifier
from backend.platform.config import Settings

SECRET = "verified-tokens-secret-0123456789abcdefghij"


@pytest.fixture
def verifier() -> TokenVerifier:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        BETTER_AUTH_SECRET=SECRET,
        JWT_LEEWAY_SECONDS=0,
    )
    return TokenVerifier(settings)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token PyJWT is asked to verify."""
    calls: list[str] = []
    real_decode = jwt.decode

    def counting_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(auth.jwt, "decode", counting_decode)
    return calls


def token(sub: str = "alice", ttl: int = 3600, secret: str = SECRET) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, secret, "HS256")


def test_a_verified_token_is_not_decoded_again(verifier: TokenVerifier, decodes: list[str]) -> None:
    alice = token()
    assert verifier.verify(alice) == "alice"
    assert verifier.verify(alice) == "alice"
    assert decodes == [alice]


def test_a_remembered_token_still_expires(verifier: TokenVerifier) -> None:
    short = token(ttl=1)
    assert verifier.verify(short) == "alice"
    expires = jwt.decode(short, options={"verify_signature": False})["exp"]
    time.sleep(max(0.0, expires - time.time()) + 0.05)
    with pytest.raises(AuthError) as refused:
        verifier.verify(short)
    assert refused.value.reason == "expired"


def test_only_the_exact_token_is_remembered(verifier: TokenVerifier, decodes: list[str]) -> None:
    alice = token()
    verifier.verify(alice)
    header, payload, _signature = alice.split(".")
    forged = token(secret="another-secret-0123456789abcdefghijklmnop")
    with pytest.raises(AuthError) as refused:
        verifier.verify(f"{header}.{payload}.{forged.split('.')[2]}")
    assert refused.value.reason == "bad_signature"


def test_refused_tokens_are_not_remembered(verifier: TokenVerifier, decodes: list[str]) -> None:
    expired = token(ttl=-60)
    for _ in range(2):
        with pytest.raises(AuthError):
            verifier.verify(expired)
    assert decodes == [expired, expired]


def test_the_memory_is_bounded(
    verifier: TokenVerifier, decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "VERIFIED_TOKENS_MAX", 3)
    tokens = [token(sub=f"user-{n}") for n in range(5)]
    for each in tokens:
        verifier.verify(each)
    decodes.clear()
    assert [verifier.verify(each) for each in tokens[2:]] == ["user-2", "user-3", "user-4"]
    assert decodes == []  # the three newest are remembered
    verifier.verify(tokens[0])
    assert decodes == [tokens[0]]  # the oldest was dropped
