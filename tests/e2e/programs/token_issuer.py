"""
A token issuer for ``docker-registry``'s ``auth: token`` mode, run by the
end-to-end tests as ``python token_issuer.py ...``.

``GET /token?service=S&scope=repository:NAME:pull`` answers
``{"token": JWT, "access_token": JWT, "expires_in": 300}``.  The JWT is
signed RS256 with ``--key``; its header carries ``x5c`` = [``--cert``], the
self-signed certificate the registry trusts as ``rootcertbundle``.

- correct ``Authorization: Basic`` credentials: the token grants ``pull`` on
  every requested repository scope;
- no ``Authorization`` header: an anonymous token that grants nothing (as
  Docker Hub does for a private repository);
- anything else: 401.

With ``--grants FILE`` (JSON: ``{"user": {"password": P, "repositories":
[names]}}``, read again at every request, so that a test revokes access by
rewriting it), those users are accepted too, each granted ``pull`` only on
the requested repositories listed for it (Docker Hub's answer to a user
without access: a token that grants nothing, which the registry refuses).

Every request is appended to ``--log`` as one JSON line, with whether an
``Authorization`` header was present, which user it named (never the
password) and the last characters of the token issued (``token_tail``).
Standard library and ``cryptography`` only; binds 127.0.0.1 on a free port
and writes ``{"port": N}`` to ``--ready-file`` when listening.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

LIFETIME = 300


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Issuer:
    def __init__(self, options: argparse.Namespace) -> None:
        key = serialization.load_pem_private_key(
            Path(options.key).read_bytes(), password=None
        )
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SystemExit("--key must be an RSA key")
        self.key = key
        certificate = x509.load_pem_x509_certificate(Path(options.cert).read_bytes())
        self.x5c = base64.b64encode(
            certificate.public_bytes(serialization.Encoding.DER)
        ).decode("ascii")
        self.username: str = options.username
        self.password: str = options.password
        self.issuer: str = options.issuer
        self.service: str = options.service
        self.log_path = Path(options.log)
        self.grants_path = Path(options.grants) if options.grants else None
        self.lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self.lock, self.log_path.open("a") as log:
            log.write(line)
            log.flush()

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + LIFETIME,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = ".".join(
            b64url(json.dumps(part, separators=(",", ":")).encode())
            for part in (header, claims)
        )
        signature = self.key.sign(
            signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
        )
        return signing_input + "." + b64url(signature)

    def check(self, authorization: str | None) -> tuple[str | None, bool]:
        """``(user named, credentials correct)`` for an Authorization header."""
        if authorization is None:
            return None, False
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None, False
        user, _, password = decoded.partition(":")
        if user == self.username and password == self.password:
            return user, True
        listed = self.listed().get(user)
        return user, listed is not None and listed.get("password") == password

    def listed(self) -> dict[str, Any]:
        """The users of ``--grants``, as the file says now."""
        if self.grants_path is None:
            return {}
        document: dict[str, Any] = json.loads(self.grants_path.read_text())
        return document

    def allowed(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        """What *user* (whose credentials are correct) is granted of *scopes*."""
        access = grants(scopes)
        listed = self.listed().get(user or "")
        if user == self.username or listed is None:
            return access
        repositories = listed.get("repositories", [])
        return [entry for entry in access if entry["name"] in repositories]


def grants(scopes: list[str]) -> list[dict[str, Any]]:
    access = []
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind == "repository" and name and "pull" in actions.split(","):
            access.append({"type": "repository", "name": name, "actions": ["pull"]})
    return access


def make_handler(issuer: Issuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            scopes = [s for value in query.get("scope", []) for s in value.split()]
            authorization = self.headers.get("Authorization")
            user, correct = issuer.check(authorization)
            entry: dict[str, Any] = {
                "path": url.path,
                "service": query.get("service", [None])[0],
                "scopes": scopes,
                "authorization": authorization is not None,
                "user": user,
                "credentials_ok": correct,
            }
            if url.path != "/token":
                status, document = 404, {"details": "not found"}
            elif authorization is None:
                token = issuer.sign("", [])
                status = 200
                document = {"token": token, "access_token": token}
            elif correct:
                granted = issuer.allowed(user, scopes)
                entry["granted"] = [g["name"] for g in granted]
                token = issuer.sign(user or "", granted)
                status = 200
                document = {"token": token, "access_token": token}
            else:
                status = 401
                document = {
                    "errors": [
                        {"code": "UNAUTHORIZED", "message": "incorrect credentials"}
                    ]
                }
            if status == 200:
                # The signature's tail identifies the token in the log
                # without making the log a source of working tokens.
                entry["token_tail"] = document["token"][-24:]
                document["expires_in"] = LIFETIME
                document["issued_at"] = time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime()
                )
            entry["status"] = status
            issuer.record(entry)
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--username", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--grants")
    options = parser.parse_args()
    issuer = Issuer(options)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(issuer))
    server.daemon_threads = True
    ready = Path(options.ready_file)
    partial = ready.with_suffix(".partial")
    partial.write_text(json.dumps({"port": server.server_address[1]}))
    os.replace(partial, ready)
    server.serve_forever()


if __name__ == "__main__":
    main()
