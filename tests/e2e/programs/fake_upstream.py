"""
The twisted.web fake registry of ``tests/fakeregistry.py`` as a process, for
upstream behaviour that ``docker-registry`` will not show on demand.  Run by
the end-to-end tests as ``python fake_upstream.py --ready-file F --log L ...``.

- ``--image NAME=LAYOUT``: serve the tags and blobs of an OCI layout as
  repository ``NAME`` (repeatable);
- ``--token T``: every ``/v2/`` request needs ``Authorization: Bearer T``,
  else 401 with a Bearer challenge whose realm is this server's ``/token``
  (which hands out a token that is *not* T);
- ``--cdn``: blob GETs answer ``307`` to a second listener (the "CDN") that
  serves the blob to anyone;
- ``--status N --retry-after S``: every request is answered ``N`` with
  ``Retry-After: S`` (a rate-limited mirror);
- ``--fault-path REGEX``: ``--status`` only for paths REGEX matches
  (``/blobs/``: a mirror whose manifests work and blobs do not);
- ``--header 'Name: value'``: added to every answer (repeatable);
- ``--drop-after N``: a blob GET without ``Range`` sends its headers and
  the first N bytes, then the connection is cut (blobs longer than N);
- ``--hold-after N``: every blob GET, with ``Range`` or not, sends its
  headers and N bytes of the body, then nothing more, ever;
- ``--stall-at M`` (with ``--hold-after``): and never byte M of a blob or
  any after it (a transfer asked from there on sends no byte at all);
- ``--html-blobs``: blob GETs are answered ``200`` with an HTML page (a
  captive portal or a proxy's error page);
- ``--wrong-manifests``: manifests asked for by digest are answered with
  other bytes (still a manifest, with that digest claimed in
  ``Docker-Content-Digest``).

Each request is appended to ``--log`` as one JSON line: which listener
(``registry`` or ``cdn``), method, path, the ``Authorization`` header as
received (or null) and the ``Range`` header (or null).  Listens on
127.0.0.1, free ports, written as ``{"registry": N, "cdn": M}`` to
``--ready-file``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from _serving import listen, report_ready, run
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fakeregistry import FakeRegistry  # noqa: E402

MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, listener: str, request: Request) -> None:
        entry = {
            "listener": listener,
            "method": request.method.decode(),
            "path": request.path.decode(),
            "authorization": request.getHeader("Authorization"),
            "range": request.getHeader("Range"),
        }
        with self.path.open("a") as log:
            log.write(json.dumps(entry, sort_keys=True) + "\n")


class Registry(FakeRegistry):
    def __init__(self, options: argparse.Namespace, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.required_token: str | None = options.token
        self.status: int | None = options.status
        self.retry_after: str | None = options.retry_after
        self.extra_headers = [h.split(":", 1) for h in options.header]
        self.fault_path = re.compile(options.fault_path or "")
        self.drop_after: int | None = options.drop_after
        self.hold_after: int | None = options.hold_after
        self.stall_at: int | None = options.stall_at
        self.html_blobs: bool = options.html_blobs
        self.wrong_manifests: bool = options.wrong_manifests
        self.realm = ""

    def render(self, request: Request) -> Any:
        self.recorder.record("registry", request)
        for name, value in self.extra_headers:
            request.setHeader(name.strip(), value.strip())
        path = request.path.decode()
        if self.status is not None and self.fault_path.search(path):
            request.setResponseCode(self.status)
            if self.retry_after is not None:
                request.setHeader("Retry-After", self.retry_after)
            request.setHeader("Content-Type", "application/json")
            return json.dumps(
                {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}
            ).encode()
        if path == "/token":
            request.setHeader("Content-Type", "application/json")
            return json.dumps({"token": "anonymous", "expires_in": 300}).encode()
        if (
            self.required_token is not None
            and request.getHeader("Authorization") != f"Bearer {self.required_token}"
        ):
            request.setResponseCode(401)
            request.setHeader("Content-Type", "application/json")
            request.setHeader(
                "WWW-Authenticate", f'Bearer realm="{self.realm}",service="fake"'
            )
            return json.dumps(
                {"errors": [{"code": "UNAUTHORIZED", "message": "token"}]}
            ).encode()
        if path in ("/v2", "/v2/"):
            request.setHeader("Content-Type", "application/json")
            return b"{}"
        return super().render(request)

    def _blob(self, digest: str, request: Request) -> Any:
        data = self.blobs.get(digest)
        if data is None or request.method != b"GET":
            return super()._blob(digest, request)
        if self.html_blobs:
            request.setHeader("Content-Type", "text/html; charset=utf-8")
            return b"<!DOCTYPE html><html><body>Please log in.</body></html>\n"
        if self.hold_after is not None:
            return self._held_blob(digest, data, request)
        return super()._blob(digest, request)

    def _held_blob(self, digest: str, data: bytes, request: Request) -> Any:
        """Headers and ``hold_after`` bytes of the body (not past
        ``stall_at``), then silence."""
        assert self.hold_after is not None
        start = 0
        wanted = request.getHeader("Range") or ""
        if wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[len("bytes=") : -1])
            request.setResponseCode(206)
            request.setHeader(
                "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"
            )
        request.setHeader("Content-Type", self.blob_type)
        request.setHeader("Docker-Content-Digest", digest)
        request.setHeader("Content-Length", str(len(data) - start))
        end = start + self.hold_after
        if self.stall_at is not None:
            end = max(start, min(end, self.stall_at))
        request.write(data[start:end])
        self.held.append((request, b""))
        return NOT_DONE_YET

    def _manifest(self, name: str, reference: str, request: Request) -> Any:
        found = self.manifests.get(reference)
        if not self.wrong_manifests or found is None:
            return super()._manifest(name, reference, request)
        media_type, body = found
        # Still JSON and still this manifest's content, but other bytes:
        # only the digest can tell.
        other = body + b"\n"
        request.setHeader("Content-Type", media_type)
        request.setHeader("Docker-Content-Digest", reference)
        request.setHeader("Content-Length", str(len(other)))
        return b"" if request.method == b"HEAD" else other

    def render_cdn(self, request: Request) -> Any:
        """A blob for anyone who asks: what a CDN behind a redirect does."""
        path = request.path.decode()
        if not path.startswith("/cdn/"):
            return self._missing(request, "NOT_FOUND")
        return self._blob(path[len("/cdn/") :], request)

    def load(self, name: str, layout: Path) -> None:
        for blob in (layout / "blobs" / "sha256").iterdir():
            data = blob.read_bytes()
            digest = self.add_blob(data)
            try:
                media_type = json.loads(data).get("mediaType")
            except (ValueError, AttributeError):
                media_type = None
            if media_type in MANIFEST_TYPES:
                self.manifests[digest] = (media_type, data)
        index = json.loads((layout / "index.json").read_bytes())
        for entry in index["manifests"]:
            tag = entry.get("annotations", {}).get("org.opencontainers.image.ref.name")
            if tag:
                self.tags[(name, tag)] = entry["digest"]


class Cdn(Resource):
    isLeaf = True

    def __init__(self, registry: Registry, recorder: Recorder) -> None:
        super().__init__()
        self.registry = registry
        self.recorder = recorder

    def render(self, request: Request) -> Any:
        self.recorder.record("cdn", request)
        return self.registry.render_cdn(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--token")
    parser.add_argument("--cdn", action="store_true")
    parser.add_argument("--status", type=int)
    parser.add_argument("--retry-after")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--fault-path")
    parser.add_argument("--drop-after", type=int)
    parser.add_argument("--hold-after", type=int)
    parser.add_argument("--stall-at", type=int)
    parser.add_argument("--html-blobs", action="store_true")
    parser.add_argument("--wrong-manifests", action="store_true")
    options = parser.parse_args()

    recorder = Recorder(Path(options.log))
    registry = Registry(options, recorder)
    for spec in options.image:
        name, _, layout = spec.partition("=")
        registry.load(name, Path(layout))
    if options.drop_after is not None:
        for digest, data in registry.blobs.items():
            if len(data) > options.drop_after:
                registry.drop[digest] = options.drop_after

    async def start() -> None:
        ports = {"registry": await listen(Site(registry))}
        registry.realm = f"http://127.0.0.1:{ports['registry']}/token"
        if options.cdn:
            ports["cdn"] = await listen(Site(Cdn(registry, recorder)))
            registry.redirect = f"http://127.0.0.1:{ports['cdn']}"
        report_ready(options.ready_file, ports)

    run(start)


if __name__ == "__main__":
    main()
