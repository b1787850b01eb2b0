"""Bearer JWTs of the control center: verified with scopes for every API request, minted by the
operator CLI. ES256 on purpose: nginx and the app hold only the public key; the private key stays
with whoever mints tokens (`python -m app.cli token`)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from app.errors import Unauthorized
from app.settings import AuthSettings

# Only this algorithm is accepted, whatever a token's header says.
ALGORITHM = "ES256"


class Scope(StrEnum):
    TASKS_READ = "tasks:read"
    TASKS_WRITE = "tasks:write"
    DEVICES_ADMIN = "devices:admin"
    PROCESSES_READ = "processes:read"
    PROCESSES_WRITE = "processes:write"
    # Complete human steps; which ones also needs the step's role as a scope `role:<name>`.
    PROCESSES_WORK = "processes:work"


ROLE_SCOPE_PREFIX = "role:"


@dataclass(frozen=True)
class Principal:
    """Who sent the request (the token's `sub`), what it may do, and until when (the token's
    `exp`, a Unix time; None for ANONYMOUS)."""

    subject: str
    scopes: frozenset[str]
    expires_at: float | None = None


# With auth disabled (a throw-away local run) every request may do everything.
ANONYMOUS = Principal("anonymous", frozenset(Scope))


def holds_role(principal: Principal, role: str) -> bool:
    """Whether the principal may work on steps of `role` (everybody may when auth is off)."""
    return principal is ANONYMOUS or f"{ROLE_SCOPE_PREFIX}{role}" in principal.scopes


# Tokens remembered after a full check; a control center uses a few tokens for many requests.
MAX_VERIFIED_TOKENS = 1024


class TokenVerifier:
    """Checks signature, exp, nbf, aud, iss and sub; the public key is read once, at start-up.

    A token that passed every check is remembered until its `exp` (an ES256 verification costs
    more CPU than the rest of a small request), at most MAX_VERIFIED_TOKENS, the oldest forgotten
    first. A token that failed is never remembered.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._key: EllipticCurvePublicKey | None = None
        # token -> (principal, its exp)
        self._verified: dict[str, tuple[Principal, float]] = {}
        if settings.enabled:
            key = load_pem_public_key(settings.public_key_file.read_bytes())
            if not isinstance(key, EllipticCurvePublicKey):
                raise ValueError(f"{settings.public_key_file} is not an EC public key ({ALGORITHM})")
            self._key = key

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def verify(self, token: str) -> Principal:
        """The token's principal; Unauthorized for anything but a valid, current token for us."""
        if self._key is None:
            return ANONYMOUS
        remembered = self._verified.get(token)
        if remembered is not None:
            principal, expires = remembered
            if time.time() < expires:
                return principal
            del self._verified[token]
        principal, expires = self._check(token, self._key)
        if len(self._verified) >= MAX_VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = principal, expires
        return principal

    def _check(self, token: str, key: EllipticCurvePublicKey) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway_s,
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"Invalid bearer token: {exc}.") from exc
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise Unauthorized("Invalid bearer token: `scope` must be a space-separated string.")
        expires = float(claims["exp"])
        return Principal(claims["sub"], frozenset(scope.split()), expires), expires


def mint_token(settings: AuthSettings, subject: str, scopes: Iterable[str], ttl_s: int) -> str:
    """A token for an operator, signed with the key in `settings.signing_key_file`."""
    now = int(time.time())
    claims = {
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
    }
    return jwt.encode(claims, settings.signing_key_file.read_bytes(), algorithm=ALGORITHM)


# The console's session: the operator's own API token, kept by the browser in this cookie
# (HttpOnly, Secure, SameSite=Strict) so that its EventSource and its forms authenticate like any
# API client. nginx (nginx/edge.js) reads the same name.
SESSION_COOKIE = "swarm_session"
# The header every state-changing request made with the cookie must carry (the console sends it
# with each htmx request): the synchroniser token of the session, csrf_token(the cookie's token).
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def csrf_token(token: str) -> str:
    """The CSRF token of a session: derived from its (HttpOnly) token, so another site can neither
    read nor forge it, and no server-side state is needed. Not the token itself: a page that shows
    it must not reveal the credential."""
    return hashlib.sha256(b"swarm-core csrf\0" + token.encode()).hexdigest()


def same_origin(origin: str | None, host: str | None) -> bool:
    """A browser's Origin header names the host it was sent to (ports aside: nginx forwards
    `Host` without one); no Origin (a same-origin GET, a non-browser client) passes."""
    if origin is None:
        return True
    origin_host = urlsplit(origin).hostname
    return origin_host is not None and host is not None and origin_host == urlsplit(f"//{host}").hostname
