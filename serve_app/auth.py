"""Who is calling, and what they may do.

`Authorization: Bearer <token>`, where the token is one of:
- an API key from the state store (stored hashed; `proctor token create`);
- a JWT signed HS256 with the platform's secret (`iss` = `jwt_issuer`; claims `sub`, `role`);
- a JWT signed RS256 or ES256 by the OIDC issuer (`oidc_issuer`), verified against its
  JWKS, with the audience `oidc_audience`; the user is `oidc_user_claim` (else `sub`) and
  the role `oidc_role_claim` (single sign-on).
Every JWT must carry `exp`. Roles, from least to most: viewer (reads), researcher
(submits; reads and stops its own), safety (stops anyone's), admin (everything,
manages tokens).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

from cluster.state import StateStore
from proctor.settings import Settings

from .errors import ApiError

ROLE_RANK = {"viewer": 0, "researcher": 1, "safety": 2, "admin": 3}
OIDC_ALGORITHMS = ["RS256", "ES256"]
JWKS_TTL_S = 300.0


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    key: str = ""  # what the rate limit counts against: one API key or one JWT subject

    def at_least(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]

    def require(self, role: str, action: str) -> None:
        if not self.at_least(role):
            raise ApiError(403, "forbidden", f"{action} needs the {role} role; {self.name} is a {self.role}")

    def may_read(self, owner: str) -> bool:
        return self.role != "researcher" or owner == self.name

    def may_stop(self, owner: str) -> bool:
        return self.at_least("safety") or (self.role == "researcher" and owner == self.name)


def _refuse(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message)


def platform_secret(settings: Settings, create: bool = False) -> str | None:
    """The HS256 secret: the setting, else `<home>/jwt-secret` (made 0600 when `create`)."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path: Path = settings.jwt_secret_file
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip() if path.exists() else None


def mint_jwt(settings: Settings, user: str, role: str, ttl_s: float = 3600.0) -> str:
    """A platform JWT (HS256) for `user` with `role`, valid for `ttl_s` seconds."""
    secret = platform_secret(settings, create=True)
    now = int(time.time())
    return jwt.encode({"iss": settings.jwt_issuer, "sub": user, "role": role, "iat": now,
                       "exp": now + int(ttl_s)}, secret, algorithm="HS256")


class Authenticator:
    """Turns an Authorization header into a `Principal`, or raises `ApiError` 401."""

    def __init__(self, store: StateStore, settings: Settings):
        self.store = store
        self.settings = settings
        self._jwks: tuple[jwt.PyJWKSet, float] | None = None
        self._secret: str | None = None  # read once: `proctor up` makes it before the API starts

    def __call__(self, header: str | None) -> Principal:
        if not header:
            raise _refuse("missing Authorization header; send 'Authorization: Bearer <token>'")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise _refuse("the Authorization header must be 'Bearer <token>'")
        return self.token(secret)

    def token(self, secret: str) -> Principal:
        if secret.count(".") == 2:
            return self._jwt(secret)
        found = self.store.verify_token(secret)
        if found is None:
            raise _refuse("the token is unknown, revoked or expired")
        user, token = found
        return Principal(user.name, user.role, f"key:{token.id}")

    # ------------------------------------------------------------ JWTs

    def _jwt(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _refuse(f"the token is not a valid JWT: {exc}") from None
        issuer, alg = claims.get("iss"), header.get("alg")
        s = self.settings
        if issuer == s.jwt_issuer and alg == "HS256":
            self._secret = self._secret or platform_secret(s)
            key: Any = self._secret
            if key is None:
                raise _refuse("this platform has no JWT secret; use an API key")
            options: dict[str, Any] = {"algorithms": ["HS256"], "issuer": s.jwt_issuer}
            user_claim, role_claim = "sub", "role"
        elif s.oidc_issuer and issuer == s.oidc_issuer and alg in OIDC_ALGORITHMS:
            kid = header.get("kid")
            key = self._signing_key(kid)
            options = {"algorithms": OIDC_ALGORITHMS, "issuer": s.oidc_issuer}
            if s.oidc_audience:
                options["audience"] = s.oidc_audience
            user_claim, role_claim = s.oidc_user_claim, s.oidc_role_claim
        else:
            raise _refuse(f"JWTs from issuer {issuer!r} signed {alg} are not trusted here")
        try:
            verified = jwt.decode(token, key, options={"require": ["exp", "iss"]}, leeway=5, **options)
        except jwt.ExpiredSignatureError:
            raise _refuse("the token expired") from None
        except jwt.PyJWTError as exc:
            raise _refuse(f"the token was refused: {exc}") from None
        user = verified.get(user_claim) or verified.get("sub")
        role = verified.get(role_claim)
        if not isinstance(user, str) or not user:
            raise _refuse(f"the token names no user (claim {user_claim!r} or 'sub')")
        if role not in ROLE_RANK:
            raise _refuse(f"the token's {role_claim!r} claim must be one of {', '.join(ROLE_RANK)}; got {role!r}")
        return Principal(user, role, f"jwt:{verified['iss']}:{user}")

    def _signing_key(self, kid: str | None) -> Any:
        keys = self._keys(refresh=False)
        found = _find_key(keys, kid)
        if found is None:  # a key rotated in since we last looked
            found = _find_key(self._keys(refresh=True), kid)
        if found is None:
            raise _refuse(f"the issuer's JWKS has no key {kid!r}")
        return found.key

    def _keys(self, refresh: bool) -> jwt.PyJWKSet:
        now = time.monotonic()
        if self._jwks is not None and not refresh and now - self._jwks[1] < JWKS_TTL_S:
            return self._jwks[0]
        url = self.settings.oidc_jwks_url
        try:
            with httpx.Client(timeout=5) as http:
                if not url:
                    conf = http.get(self.settings.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration")
                    conf.raise_for_status()
                    url = conf.json()["jwks_uri"]
                answer = http.get(url)
                answer.raise_for_status()
                keys = jwt.PyJWKSet.from_dict(answer.json())
        except (httpx.HTTPError, ValueError, KeyError, jwt.PyJWTError) as exc:
            raise ApiError(503, "identity_provider_unavailable",
                           f"the OIDC issuer's keys could not be read: {exc}") from None
        self._jwks = (keys, now)
        return keys


def _find_key(keys: jwt.PyJWKSet, kid: str | None) -> Any:
    for k in keys.keys:
        if kid is None or k.key_id == kid:
            return k
    return None
