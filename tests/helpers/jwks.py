"""A JWKS endpoint served by the test on 127.0.0.1, and the documents it serves."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

Key = ec.EllipticCurvePrivateKey


def jwk(key: Key, kid: str) -> dict[str, Any]:
    """Return the public JWK of an ES256 key."""
    public: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**public, "kid": kid, "use": "sig", "alg": "ES256"}


def jwks(**keys: Key) -> bytes:
    """Return a JWKS document holding the public keys, each under its kid."""
    return json.dumps({"keys": [jwk(key, kid) for kid, key in keys.items()]}).encode()


class JwksServer:
    """A JWKS endpoint on 127.0.0.1:<ephemeral>, serving whatever the test sets."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.status = 200
        self.cache_control = "max-age=300"
        self.hits = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", owner.cache_control)
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)
