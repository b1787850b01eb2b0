"""Tokens that must be refused, by nginx and by the app alike, made with the stack's own key
where only one claim is wrong."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.auth import ALGORITHM, Scope, mint_token
from app.settings import AuthSettings


def new_signing_key(path: Path) -> Path:
    """Another P-256 key: right algorithm, wrong signer."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()


# Every way a token is refused, one test case each (refused_tokens makes them).
REFUSED = (
    "no token",
    "not a JWT",
    "bad signature",
    "expired",
    "not yet valid",
    "wrong audience",
    "wrong issuer",
    "alg none",
)


def refused_tokens(auth: AuthSettings, other_key: Path) -> dict[str, str | None]:
    """Why -> token (None: no token at all). Each carries every scope, so only the flaw refuses it."""
    scopes = list(Scope)
    now = int(time.time())
    claims = {"iss": auth.issuer, "aud": auth.audience, "sub": "tests", "scope": " ".join(scopes)}
    return {
        "no token": None,
        "not a JWT": "not-a-jwt",
        "bad signature": mint_token(auth.model_copy(update={"signing_key_file": other_key}), "tests", scopes, 60),
        # Well past the 10 s leeway that both nginx and the app allow for clock skew.
        "expired": mint_token(auth, "tests", scopes, -60),
        "not yet valid": jwt.encode(
            claims | {"nbf": now + 300, "exp": now + 600}, auth.signing_key_file.read_bytes(), algorithm=ALGORITHM
        ),
        "wrong audience": mint_token(auth.model_copy(update={"audience": "someone-else"}), "tests", scopes, 60),
        "wrong issuer": mint_token(auth.model_copy(update={"issuer": "someone-else"}), "tests", scopes, 60),
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims | {'exp': now + 60})}.",
    }
