"""A JWKS endpoint for tests: serves whatever document it is given, counts its requests, and can
be made slow, broken or trickling (a byte at a time), plus key pairs of each kind Better Auth's
JWT plugin can use."""

import json
import ssl
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
    """`delay`: seconds before answering. `trickle`: seconds between two bytes of the answer
    (the body only; with `trickle_headers` the status line and headers too), stopping when the
    client hangs up. `active` counts the answers being sent now, `max_active` the most at once;
    `authorizations` lists each request's Authorization header. With `tls` (a server context),
    it serves HTTPS as `localhost`."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.document: bytes = b'{"keys": []}'
        self.status = 200
        self.delay = 0.0
        self.trickle = 0.0
        self.trickle_headers = False
        self.hits = 0
        self.active = 0
        self.max_active = 0
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with server._lock:
                    server.hits += 1
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                    server.authorizations.append(self.headers.get("Authorization"))
                try:
                    time.sleep(server.delay)
                    self._answer(server.document, server.trickle)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up
                finally:
                    with server._lock:
                        server.active -= 1

            def _answer(self, document: bytes, trickle: float) -> None:
                head = (
                    f"HTTP/1.1 {server.status} {self.responses[server.status][0]}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(document)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                if not trickle:
                    self.wfile.write(head + document)
                    return
                if not server.trickle_headers:
                    self.wfile.write(head)
                    head = b""
                for byte in head + document:
                    if server._closing.wait(trickle):
                        return
                    # The first write after the client hung up draws its RST, the next fails.
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()

            def log_message(self, *_args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        scheme = "https://localhost" if tls is not None else "http://127.0.0.1"
        self.base_url = f"{scheme}:{self._httpd.server_address[1]}"
        self.url = f"{self.base_url}/api/auth/jwks"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def publish(self, *keys: KeyPair | dict[str, Any]) -> None:
        jwks = [k.public_jwk() if isinstance(k, KeyPair) else k for k in keys]
        self.document = json.dumps({"keys": jwks}).encode()

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
