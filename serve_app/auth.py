"""Who is calling, and what they may do.

`Authorization: Bearer <key>` with an API key from the state store (stored hashed).
Roles, from least to most: viewer (reads), researcher (submits; reads and stops its
own), safety (stops anyone's), admin (everything, manages tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.state import StateStore

from .errors import ApiError

ROLE_RANK = {"viewer": 0, "researcher": 1, "safety": 2, "admin": 3}


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def at_least(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]

    def require(self, role: str, action: str) -> None:
        if not self.at_least(role):
            raise ApiError(403, "forbidden", f"{action} needs the {role} role; {self.name} is a {self.role}")

    def may_read(self, owner: str) -> bool:
        return self.role != "researcher" or owner == self.name

    def may_stop(self, owner: str) -> bool:
        return self.at_least("safety") or (self.role == "researcher" and owner == self.name)


def authenticate(store: StateStore, header: str | None) -> Principal:
    """The caller of a request. Raises `ApiError` 401 for a missing or bad token."""
    if not header:
        raise ApiError(401, "unauthenticated", "missing Authorization header; send 'Authorization: Bearer <token>'")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "unauthenticated", "the Authorization header must be 'Bearer <token>'")
    found = store.verify_token(secret.strip())
    if found is None:
        raise ApiError(401, "unauthenticated", "the token is unknown, revoked or expired")
    user, _token = found
    return Principal(user.name, user.role)
