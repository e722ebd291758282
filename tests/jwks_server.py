"""A JWKS endpoint for tests: serves whatever document it is given, counts its requests, and can
be made slow or broken, plus key pairs of each kind Better Auth's JWT plugin can use."""

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


@dataclass
class KeyPair:
    alg: str
    private_key: Any
    kid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def generate(cls, alg: str) -> "KeyPair":
        if alg == "EdDSA":
            private: Any = ed25519.Ed25519PrivateKey.generate()
        elif alg in ("ES256", "ES384", "ES512"):
            curve = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}[alg]
            private = ec.generate_private_key(curve())
        else:
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(alg, private)

    def public_jwk(self, **overrides: Any) -> dict[str, Any]:
        public = self.private_key.public_key()
        exporter: Any = {"Ed": OKPAlgorithm, "ES": ECAlgorithm}.get(self.alg[:2], RSAAlgorithm)
        jwk = exporter.to_jwk(public, as_dict=True)
        jwk.update({"kid": self.kid, "alg": self.alg}, **overrides)
        return {k: v for k, v in jwk.items() if v is not None}

    def sign(self, payload: dict[str, Any], **header: Any) -> str:
        headers = {"kid": self.kid, **header}
        return jwt.encode(payload, self.private_key, algorithm=self.alg, headers=headers)


class JwksServer:
    def __init__(self) -> None:
        self.document: bytes = b'{"keys": []}'
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with server._lock:
                    server.hits += 1
                time.sleep(server.delay)
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.document)))
                self.end_headers()
                self.wfile.write(server.document)

            def log_message(self, *_args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.url = f"{self.base_url}/api/auth/jwks"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def publish(self, *keys: KeyPair | dict[str, Any]) -> None:
        jwks = [k.public_jwk() if isinstance(k, KeyPair) else k for k in keys]
        self.document = json.dumps({"keys": jwks}).encode()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
