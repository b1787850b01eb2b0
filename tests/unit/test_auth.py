"""Token checks of the app (PyJWT, ES256) without a server: what passes, what is refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.auth import ANONYMOUS, Scope, TokenVerifier, csrf_token, mint_token, same_origin
from app.errors import Unauthorized
from app.settings import AuthSettings
from tests.tokens import REFUSED, new_signing_key, refused_tokens


@pytest.fixture
def auth(tmp_path: Path) -> AuthSettings:
    signing = new_signing_key(tmp_path / "signing.key")
    key = serialization.load_pem_private_key(signing.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public = tmp_path / "public.pem"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return AuthSettings(public_key_file=public, signing_key_file=signing)


def test_a_minted_token_carries_subject_and_scopes(auth: AuthSettings) -> None:
    token = mint_token(auth, "alice", [Scope.TASKS_READ, Scope.TASKS_WRITE], 60)
    principal = TokenVerifier(auth).verify(token)
    assert principal.subject == "alice"
    assert principal.scopes == {"tasks:read", "tasks:write"}


@pytest.mark.parametrize("why", [why for why in REFUSED if why != "no token"])
def test_flawed_tokens_are_refused(auth: AuthSettings, tmp_path: Path, why: str) -> None:
    token = refused_tokens(auth, new_signing_key(tmp_path / "other.key"))[why]
    assert token is not None
    with pytest.raises(Unauthorized):
        TokenVerifier(auth).verify(token)


def test_disabled_auth_lets_everything_through(tmp_path: Path) -> None:
    verifier = TokenVerifier(AuthSettings(enabled=False, public_key_file=tmp_path / "absent.pem"))
    assert not verifier.enabled
    assert verifier.verify("anything") == ANONYMOUS


def test_a_key_for_another_algorithm_is_refused_at_start(tmp_path: Path) -> None:
    rsa_public = tmp_path / "rsa.pem"
    rsa_public.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an EC public key"):
        TokenVerifier(AuthSettings(public_key_file=rsa_public))


def test_a_remembered_token_is_refused_once_it_expires(auth: AuthSettings) -> None:
    verifier = TokenVerifier(auth.model_copy(update={"leeway_s": 0}))
    token = mint_token(auth, "alice", [Scope.TASKS_READ], 2)
    assert verifier.verify(token).subject == "alice"
    assert verifier.verify(token).subject == "alice"  # remembered: no second signature check
    time.sleep(2.1)  # past its exp (at most 2 s after minting)
    with pytest.raises(Unauthorized, match="expired"):
        verifier.verify(token)


def test_the_csrf_token_is_the_sessions_own_and_not_the_token() -> None:
    assert csrf_token("a.b.c") == csrf_token("a.b.c")
    assert csrf_token("a.b.c") != csrf_token("a.b.d")
    assert "a.b.c" not in csrf_token("a.b.c")


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        (None, "localhost:8443", True),
        ("https://localhost:8443", "localhost", True),
        ("https://localhost:8443", "localhost:8443", True),
        ("https://evil.example", "localhost", False),
        ("https://localhost.evil.example", "localhost", False),
        ("null", "localhost", False),
        ("https://localhost", None, False),
    ],
)
def test_same_origin_compares_host_names(origin: str | None, host: str | None, same: bool) -> None:
    assert same_origin(origin, host) is same
