"""Auth, tokens and limits of the real Serve app: platform JWTs, OIDC JWTs verified against
a real JWKS over HTTP, API keys made through the API, rate limits, body limits, CORS."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest

from apiserver import auth, spec
from oidc import Issuer
from serve_app.auth import mint_jwt

pytestmark = pytest.mark.ray


def test_platform_jwt_acts_as_its_subject(api: Any) -> None:
    client, tokens, _ = api
    r = client.post("/api/v1/evaluations", json=spec("jwt"), headers=auth(mint_jwt(client.settings, "jo", "researcher")))
    assert r.status_code == 202, r.text
    # the evaluation belongs to the JWT's subject: another researcher cannot see it
    eval_id = r.json()["id"]
    assert client.get(f"/api/v1/evaluations/{eval_id}", headers=auth(tokens["rita"])).status_code == 404
    mine = client.get(f"/api/v1/evaluations/{eval_id}", headers=auth(mint_jwt(client.settings, "jo", "viewer")))
    assert mine.json()["owner"] == "jo"


def _refused(client: Any, token: str) -> str:
    r = client.get("/api/v1/evaluations", headers=auth(token))
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthenticated"
    return r.json()["error"]["message"]


def test_bad_jwts_are_refused(api: Any) -> None:
    client, _, _ = api
    s = client.settings
    assert "expired" in _refused(client, mint_jwt(s, "jo", "researcher", ttl_s=-60))
    now = int(time.time())
    forged = jwt.encode({"iss": s.jwt_issuer, "sub": "jo", "role": "admin", "exp": now + 60}, "another-secret-of-32-bytes-or-more",
                        algorithm="HS256")
    assert "refused" in _refused(client, forged)
    stranger = jwt.encode({"iss": "https://evil.example", "sub": "jo", "role": "admin", "exp": now + 60},
                          s.jwt_secret, algorithm="HS256")
    assert "not trusted" in _refused(client, stranger)
    assert "role" in _refused(client, mint_jwt(s, "jo", "overlord"))
    no_exp = jwt.encode({"iss": s.jwt_issuer, "sub": "jo", "role": "admin"}, s.jwt_secret, algorithm="HS256")
    assert "exp" in _refused(client, no_exp)
    unsigned = jwt.encode({"iss": s.jwt_issuer, "sub": "jo", "role": "admin", "exp": now + 60}, None, algorithm="none")
    _refused(client, unsigned)


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
def test_oidc_tokens_rs256_and_es256(api: Any, kid: str) -> None:
    client, _, _ = api
    issuer: Issuer = client.issuer
    r = client.post("/api/v1/evaluations", json=spec("sso"), headers=auth(issuer.token("sso-user", "researcher", kid)))
    assert r.status_code == 202, r.text
    got = client.get(f"/api/v1/evaluations/{r.json()['id']}", headers=auth(issuer.token("sso-user", "viewer", kid)))
    assert got.json()["owner"] == "sso-user"
    viewer = client.post("/api/v1/evaluations", json=spec("sso"), headers=auth(issuer.token("v", "viewer", kid)))
    assert viewer.status_code == 403


def test_oidc_refusals(api: Any) -> None:
    client, _, _ = api
    issuer: Issuer = client.issuer
    assert "expired" in _refused(client, issuer.token("u", "viewer", ttl_s=-60))
    assert "audience" in _refused(client, issuer.token("u", "viewer", aud="someone-else")).lower()
    assert "role" in _refused(client, issuer.token("u", None))
    other = Issuer()  # a real issuer this platform does not trust
    try:
        assert "not trusted" in _refused(client, other.token("u", "admin"))
        # a token claiming the trusted issuer but signed with another key
        forged = other.token("u", "admin", iss=issuer.url)
        _refused(client, forged)
    finally:
        other.close()


def test_tokens_created_listed_and_revoked_through_the_api(api: Any) -> None:
    client, tokens, _ = api
    admin = auth(tokens["ada"])
    r = client.post("/api/v1/tokens", json={"user": "tina", "role": "researcher", "name": "ci", "expires_in_days": 7},
                    headers=admin)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["user"] == "tina" and made["role"] == "researcher" and made["expires_at"]
    secret = made["token"]
    assert client.post("/api/v1/evaluations", json=spec("tina"), headers=auth(secret)).status_code == 202
    listed = client.get("/api/v1/tokens", headers=admin).json()["items"]
    row = next(t for t in listed if t["id"] == made["id"])
    assert row["user"] == "tina" and not row["revoked"] and secret not in str(listed)
    # tina sees only her own keys
    assert {t["user"] for t in client.get("/api/v1/tokens", headers=auth(secret)).json()["items"]} == {"tina"}
    assert client.delete(f"/api/v1/tokens/{made['id']}", headers=admin).json() == {"id": made["id"], "revoked": True}
    assert client.get("/api/v1/evaluations", headers=auth(secret)).status_code == 401


def test_token_management_is_refused_rightly(api: Any) -> None:
    client, tokens, _ = api
    body = {"user": "x", "role": "admin", "name": "escalate"}
    r = client.post("/api/v1/tokens", json=body, headers=auth(tokens["rita"]))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = client.post("/api/v1/tokens", json={"user": "rita", "role": "admin"}, headers=auth(tokens["ada"]))
    assert r.status_code == 409  # rita is a researcher: no silent promotion
    r = client.post("/api/v1/tokens", json={"user": "nobody-yet"}, headers=auth(tokens["ada"]))
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "body.role"
    r = client.post("/api/v1/tokens", json={"user": "bad name!", "role": "viewer"}, headers=auth(tokens["ada"]))
    assert r.status_code == 422 and "user" in r.json()["error"]["message"]
    ada_token = next(t["id"] for t in client.get("/api/v1/tokens", headers=auth(tokens["ada"])).json()["items"]
                     if t["user"] == "ada")
    r = client.delete(f"/api/v1/tokens/{ada_token}", headers=auth(tokens["rob"]))
    assert r.status_code == 404  # another's key does not exist for a researcher
    assert client.delete("/api/v1/tokens/999999", headers=auth(tokens["ada"])).status_code == 404


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    """The limiter of the app itself (in-process, SQLite: how fast a loaded host serves
    requests through Serve decides nothing here): 2 requests/s per token with bursts of
    20; 80 requests at once get the burst, then 429 with Retry-After, and no more than the
    bucket allowed over the time they took; another token is not affected."""
    from fastapi.testclient import TestClient

    from cluster.state import StateStore
    from proctor.settings import Settings
    from serve_app.api import build_app

    state = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(state)
    store.create_user("vera", "viewer")
    secret, _ = store.create_token("vera", "rate test")
    other, _ = store.create_token("vera", "rate test 2")
    settings = Settings(home=tmp_path, state_url=state, results_uri=(tmp_path / "results").as_uri(),
                        jwt_secret="rate-limit-secret-0123456789abcdef", rate_limit_per_s=2.0,
                        rate_limit_burst=20, ray_namespace="absent-rate-limit")
    with TestClient(build_app(settings)) as client:
        def get(_: int) -> Any:
            return client.get("/api/v1/evaluations?limit=1", headers=auth(secret))

        began = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(get, range(80)))
        took = time.monotonic() - began
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 429}, codes
        assert 20 <= codes.count(200) <= 20 + 2.0 * took + 1  # the burst, then the rate
        limited = [a for a in answers if a.status_code == 429]
        assert limited, f"80 requests in {took:.1f} s must exceed 2/s with a burst of 20"
        assert int(limited[0].headers["Retry-After"]) >= 1
        assert limited[0].json()["error"]["code"] == "rate_limited"
        assert client.get("/api/v1/evaluations?limit=1", headers=auth(other)).status_code == 200
    store.close()


def test_oversized_body_is_413_and_stores_nothing(api: Any) -> None:
    client, tokens, store = api
    before = len(store.list_evaluations(limit=1000)[0])
    big = spec("big")
    big["dataset"]["samples"][0]["input"] = "x" * (2 * 1024**2)
    r = client.post("/api/v1/evaluations", json=big, headers=auth(tokens["rita"]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # a chunked body (no Content-Length) is counted as it streams
    chunks = (b'{"name": "' + b"y" * 65536 for _ in range(40))
    r = client.post("/api/v1/evaluations", content=chunks, headers={**auth(tokens["rita"]),
                                                                    "Content-Type": "application/json"})
    assert r.status_code == 413
    assert len(store.list_evaluations(limit=1000)[0]) == before


def test_cors_is_closed_by_default(api: Any) -> None:
    client, tokens, _ = api
    pre = client.options("/api/v1/evaluations", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in pre.headers
    r = client.get("/api/v1/evaluations", headers={**auth(tokens["vera"]), "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
