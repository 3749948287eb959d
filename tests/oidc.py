"""A real OIDC issuer for the tests: its discovery document and JWKS served over HTTP
(http.server on 127.0.0.1), and RS256/ES256 keys that sign its tokens."""

from __future__ import annotations

import json
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from httpjson import QuietHandler


class Issuer:
    def __init__(self, audience: str = "proctor-api") -> None:
        self.audience = audience
        self.keys = {"rsa-1": ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                     "ec-1": ("ES256", ec.generate_private_key(ec.SECP256R1()))}
        issuer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks.json"}
                elif self.path == "/jwks.json":
                    body = {"keys": [issuer.jwk(kid) for kid in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                self.reply(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def jwk(self, kid: str) -> dict[str, Any]:
        alg, key = self.keys[kid]
        algo = RSAAlgorithm if alg == "RS256" else ECAlgorithm
        return {**json.loads(algo.to_jwk(key.public_key())), "kid": kid, "alg": alg, "use": "sig"}

    def token(self, user: str, role: str | None, kid: str = "rsa-1", ttl_s: float = 600, **claims: Any) -> str:
        alg, key = self.keys[kid]
        now = int(time.time())
        body = {"iss": self.url, "aud": self.audience, "sub": f"id-{user}", "preferred_username": user,
                "iat": now, "exp": now + int(ttl_s), **claims}
        if role is not None:
            body["proctor_role"] = role
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
