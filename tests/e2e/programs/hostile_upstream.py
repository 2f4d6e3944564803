"""
A registry that misbehaves on purpose, for the hostile-upstream tests: run
as ``python hostile_upstream.py --ready-file F --log L --plan PLAN.json``.

The plan (JSON, written by the test) says what it serves:

- ``blobs``: digest → file whose bytes are that blob (any repository);
- ``manifests``: digest → ``{"path": file, "type": Content-Type}``; the
  Content-Type is sent as given, so a test can make it lie;
- ``tags``: repository → {tag → digest};
- ``modes``: repository → ``{"mode": NAME, ...}``: how requests under that
  repository misbehave (only for ``digest``, if the entry names one).

Blob modes (GET only; HEAD answers honestly):

- ``overlong``: ``Content-Length`` is the blob's size, but ``extra`` more
  bytes follow it in the same write (first a complete, plausible HTTP
  response, as if answering the next request), and the connection stays
  open;
- ``endless``: no ``Content-Length`` (chunked): the blob, then random bytes
  at ``rate`` bytes/s until ``cap`` bytes in all, then the connection is
  cut without the last chunk;
- ``short``: ``Content-Length`` is ``missing`` bytes more than is sent; the
  connection is closed after the blob's bytes; a ``Range`` request is
  answered ``416``;
- ``corrupt``: the blob with its first byte flipped, same length;
- ``gzip``: the blob's bytes unchanged, with ``Content-Encoding: gzip``;
- ``loop``: ``302`` to the same path with ``?hop=N+1``, forever;
- ``redirect``: ``302`` to ``location`` (``{port}`` in it: this server's
  port).

Listing mode (``tags/list`` and ``referrers/<digest>``, otherwise 404):

- ``listing``: ``200`` with ``body`` (text) as ``Content-Type: type``.

Modes of any request (manifest or blob, GET or HEAD):

- ``page``: every request is answered ``200 text/html`` with a page (a
  captive portal); name it under the repository ``*`` for every path
  under ``/v2/`` but ``/v2/`` itself;
- ``head``: a ``HEAD`` is answered ``status`` with exactly ``headers``
  (no Content-Type unless named there), whatever is asked (a captive
  portal, a site's fallback); a ``GET`` is ``404``;

- ``challenge``: ``401`` with ``WWW-Authenticate: Bearer realm="REALM"``,
  ``realm`` as in the mode (``{port}`` as above), whatever
  ``Authorization`` says.

Manifest modes (GET by tag or digest; HEAD answers honestly if it can):

- ``chunked``: the manifest without ``Content-Length``;
- ``endless``: chunked bytes of a never-ending JSON string at ``rate``
  bytes/s until ``cap`` bytes, then the connection is cut;
- ``stall``: headers announcing 4096 bytes, 16 bytes of body, then nothing;
- ``cut``: the manifest's headers and the first half of its body, then the
  connection is closed.

Each request is appended to ``--log`` as one JSON line: method, path, query,
and the ``Range``, ``Accept``, ``Accept-Encoding`` and ``Authorization``
headers.  Listens on 127.0.0.1 (a free port, written as ``{"registry": N}``
to ``--ready-file``).  Standard library and Twisted only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from _serving import listen, report_ready, run
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

#: writes per second of the rate-limited modes
TICKS = 50


class Hostile(Resource):
    isLeaf = True

    def __init__(self, plan: dict[str, Any], log_path: Path) -> None:
        super().__init__()
        self.log_path = log_path
        self.blobs = {d: Path(p).read_bytes() for d, p in plan.get("blobs", {}).items()}
        self.manifests = {
            d: (entry["type"], Path(entry["path"]).read_bytes())
            for d, entry in plan.get("manifests", {}).items()
        }
        self.tags: dict[str, dict[str, str]] = plan.get("tags", {})
        self.modes: dict[str, dict[str, Any]] = plan.get("modes", {})
        self.random = random.Random(1234)
        #: the port this server listens on, once it does
        self.port = 0

    # -- bookkeeping ---------------------------------------------------------

    def record(self, request: Request) -> None:
        def text(name: str) -> str | None:
            value = request.getHeader(name)
            return value.decode("latin-1") if isinstance(value, bytes) else value

        entry = {
            "method": request.method.decode("latin-1"),
            "path": request.path.decode("latin-1"),
            "query": request.uri.decode("latin-1").partition("?")[2],
            "range": text("Range"),
            "accept": text("Accept"),
            "accept_encoding": text("Accept-Encoding"),
            "authorization": text("Authorization"),
        }
        with self.log_path.open("a") as log:
            log.write(json.dumps(entry, sort_keys=True) + "\n")

    def mode_for(self, name: str, digest: str | None) -> dict[str, Any]:
        mode = self.modes.get(name, {})
        if "digest" in mode and mode["digest"] != digest:
            return {}
        return mode

    # -- HTTP ----------------------------------------------------------------

    def render(self, request: Request) -> Any:
        self.record(request)
        path = request.path.decode("latin-1")
        if path in ("/v2", "/v2/"):
            request.setHeader("Content-Type", "application/json")
            return b"{}"
        if self.modes.get("*", {}).get("mode") == "page":
            request.setHeader("Content-Type", "text/html; charset=utf-8")
            return b"<html><body>Welcome to the hotel network</body></html>"
        parts = path.split("/")[2:]
        if len(parts) >= 3 and parts[-2] in ("tags", "referrers"):
            return self.listing(request, "/".join(parts[:-2]))
        if len(parts) < 3 or parts[-2] not in ("manifests", "blobs"):
            return self.missing(request, "NAME_UNKNOWN")
        name, kind, reference = "/".join(parts[:-2]), parts[-2], parts[-1]
        mode = self.modes.get(name, {})
        if mode.get("mode") == "challenge":
            request.setResponseCode(401)
            realm = mode["realm"].replace("{port}", str(self.port))
            request.setHeader(
                "WWW-Authenticate", f'Bearer realm="{realm}",service="hostile"'
            )
            request.setHeader("Content-Type", "application/json")
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}'
        if mode.get("mode") == "head":
            if request.method != b"HEAD":
                return self.missing(request, "NAME_UNKNOWN")
            request.setResponseCode(int(mode["status"]))
            request.defaultContentType = None
            for header, value in mode["headers"].items():
                request.setHeader(header, value)
            return b""
        if kind == "blobs":
            return self.blob(request, name, reference)
        return self.manifest(request, name, reference)

    def listing(self, request: Request, name: str) -> bytes:
        mode = self.modes.get(name, {})
        if mode.get("mode") != "listing":
            return self.missing(request, "NAME_UNKNOWN")
        request.setHeader("Content-Type", mode["type"])
        return str(mode["body"]).encode("utf-8")

    def missing(self, request: Request, code: str) -> bytes:
        request.setResponseCode(404)
        request.setHeader("Content-Type", "application/json")
        return json.dumps({"errors": [{"code": code, "message": "no"}]}).encode()

    def blob(self, request: Request, name: str, digest: str) -> Any:
        mode = self.mode_for(name, digest)
        kind = mode.get("mode")
        if kind == "loop":
            hop = int((request.args.get(b"hop") or [b"0"])[0]) + 1
            request.setResponseCode(302)
            request.setHeader("Location", f"{request.path.decode()}?hop={hop}")
            return b""
        if kind == "redirect":
            request.setResponseCode(302)
            location = mode["location"].replace("{port}", str(self.port))
            request.setHeader("Location", location)
            return b""
        data = self.blobs.get(digest)
        if data is None:
            return self.missing(request, "BLOB_UNKNOWN")
        request.setHeader("Content-Type", "application/octet-stream")
        request.setHeader("Docker-Content-Digest", digest)
        if request.method == b"HEAD":
            request.setHeader("Content-Length", str(len(data)))
            return b""
        if kind == "overlong":
            return self.overlong(request, data, int(mode["extra"]))
        if kind == "endless":
            return self.endless(request, data, int(mode["rate"]), int(mode["cap"]))
        if kind == "short":
            if request.getHeader("Range"):
                request.setResponseCode(416)
                request.setHeader("Content-Range", f"bytes */{len(data)}")
                return b""
            return self.short(request, data, int(mode["missing"]))
        if kind == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if kind == "gzip":
            request.setHeader("Content-Encoding", "gzip")
        request.setHeader("Content-Length", str(len(data)))
        return data

    def manifest(self, request: Request, name: str, reference: str) -> Any:
        digest = (
            reference if ":" in reference else self.tags.get(name, {}).get(reference)
        )
        mode = self.mode_for(name, digest)
        kind = mode.get("mode")
        if kind == "endless" and request.method == b"GET":
            request.setHeader(
                "Content-Type", "application/vnd.oci.image.manifest.v1+json"
            )
            if digest:
                request.setHeader("Docker-Content-Digest", digest)
            return self.endless(
                request,
                b'{"schemaVersion":2,"pad":"',
                int(mode["rate"]),
                int(mode["cap"]),
            )
        if kind == "stall" and request.method == b"GET":
            request.setHeader(
                "Content-Type", "application/vnd.oci.image.manifest.v1+json"
            )
            request.setHeader("Content-Length", "4096")
            request.write(b'{"schemaVersion"')
            return NOT_DONE_YET
        found = self.manifests.get(digest or "")
        if found is None:
            return self.missing(request, "MANIFEST_UNKNOWN")
        media_type, body = found
        if kind == "cut" and request.method == b"GET":
            request.setHeader("Content-Type", media_type)
            request.setHeader("Docker-Content-Digest", str(digest))
            request.setHeader("Content-Length", str(len(body)))
            request.write(body[: len(body) // 2])
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        request.setHeader("Content-Type", media_type)
        request.setHeader("Docker-Content-Digest", str(digest))
        if kind != "chunked":
            request.setHeader("Content-Length", str(len(body)))
        if request.method == b"HEAD":
            return b""
        if kind == "chunked":
            # Written in pieces, so twisted.web sends it chunked.
            for start in range(0, len(body), 1 << 16):
                request.write(body[start : start + (1 << 16)])
            request.finish()
            return NOT_DONE_YET
        return body

    # -- misbehaviours -------------------------------------------------------

    def overlong(self, request: Request, data: bytes, extra: int) -> Any:
        smuggled_body = b'{"errors":[{"code":"DENIED","message":"smuggled"}]}'
        smuggled = (
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
            b"Docker-Content-Digest: sha256:" + b"e" * 64 + b"\r\n"
            b"Content-Length: "
            + str(len(smuggled_body)).encode()
            + b"\r\n\r\n"
            + smuggled_body
        )
        padding = max(0, extra - len(smuggled))
        head = (
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Docker-Content-Digest: sha256:"
            + hashlib.sha256(data).hexdigest().encode()
            + b"\r\nContent-Length: "
            + str(len(data)).encode()
            + b"\r\n\r\n"
        )
        transport = request.channel.transport
        transport.write(head + data + smuggled + b"x" * padding)
        # The connection stays open: what the client does with the rest is
        # what is being tested.
        return NOT_DONE_YET

    def short(self, request: Request, data: bytes, missing: int) -> Any:
        head = (
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: " + str(len(data) + missing).encode() + b"\r\n\r\n"
        )
        transport = request.channel.transport
        transport.write(head + data)
        transport.loseConnection()
        return NOT_DONE_YET

    def endless(self, request: Request, first: bytes, rate: int, cap: int) -> Any:
        """*first*, then random bytes at *rate* until *cap*, then a cut."""
        request.write(first)
        sent = len(first)
        per_tick = max(1, rate // TICKS)
        state: dict[str, Any] = {"sent": sent}

        def tick() -> None:
            if state["sent"] >= cap:
                loop.stop()
                request.channel.transport.abortConnection()
                return
            size = min(per_tick, cap - state["sent"])
            request.write(self.random.randbytes(size))
            state["sent"] += size

        loop = LoopingCall(tick)
        loop.start(1.0 / TICKS, now=False).addErrback(lambda _: None)

        def gone(_: Any) -> None:
            if loop.running:
                loop.stop()

        request.notifyFinish().addBoth(gone)
        return NOT_DONE_YET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--plan", required=True)
    options = parser.parse_args()
    plan = json.loads(Path(options.plan).read_text())
    hostile = Hostile(plan, Path(options.log))
    site = Site(hostile)

    async def start() -> None:
        hostile.port = await listen(site)
        report_ready(options.ready_file, {"registry": hostile.port})

    run(start)


if __name__ == "__main__":
    main()
