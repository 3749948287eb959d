"""API keys: create (admin), list (never their secrets) and revoke."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from fastapi import APIRouter

from ..deps import Caller, Store
from ..errors import ApiError
from ..models import Revoked, TokenCreated, TokenOut, TokenPage, TokenRequest

router = APIRouter(tags=["tokens"])


@router.post("/api/v1/tokens", status_code=201, response_model=TokenCreated)
async def create_token(req: TokenRequest, store: Store, who: Caller) -> TokenCreated:
    """A new API key (admin). A new user is created with `role`."""
    who.require("admin", "creating tokens")

    def create() -> TokenCreated:
        user = store.get_user(req.user)
        if user is None:
            if req.role is None:
                raise ApiError(422, "invalid_request", f"user {req.user!r} is new: give its role",
                               [{"field": "body.role", "reason": "required for a new user"}])
            user = store.create_user(req.user, req.role)
        elif req.role is not None and req.role != user.role:
            raise ApiError(409, "conflict", f"user {req.user!r} is a {user.role}, not a {req.role}")
        expires = (datetime.now(timezone.utc) + timedelta(days=req.expires_in_days)
                   if req.expires_in_days else None)
        secret, token = store.create_token(user.name, req.name, expires)
        return TokenCreated(id=token.id, token=secret, user=user.name, role=user.role, name=token.name,
                            expires_at=token.expires_at)

    return await asyncio.to_thread(create)


@router.get("/api/v1/tokens", response_model=TokenPage)
async def list_tokens(store: Store, who: Caller) -> TokenPage:
    """API keys (never their secrets): all of them for an admin, one's own otherwise."""
    def read() -> TokenPage:
        roles = {u.name: u.role for u in store.list_users()}
        found = store.list_tokens(None if who.at_least("admin") else who.name)
        return TokenPage(items=[TokenOut(id=t.id, user=t.user_name, role=roles.get(t.user_name, "viewer"),
                                         name=t.name, prefix=t.prefix, created_at=t.created_at,
                                         expires_at=t.expires_at, last_used_at=t.last_used_at,
                                         revoked=t.revoked_at is not None) for t in found])

    return await asyncio.to_thread(read)


@router.delete("/api/v1/tokens/{token_id}", response_model=Revoked)
async def revoke_token(token_id: int, store: Store, who: Caller) -> Revoked:
    """Revoke an API key: any (admin), or one's own."""
    def revoke() -> Revoked:
        mine = {t.id for t in store.list_tokens(who.name)}
        if not who.at_least("admin") and token_id not in mine:
            raise ApiError(404, "not_found", f"token {token_id} does not exist")
        return Revoked(id=token_id, revoked=store.revoke_token(token_id))

    return await asyncio.to_thread(revoke)
