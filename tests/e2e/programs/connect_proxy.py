"""
A tiny outbound HTTP proxy for the end-to-end tests, run as
``python connect_proxy.py --ready-file F --log L``.

- ``CONNECT 127.0.0.1:PORT``: answers 200 and tunnels bytes both ways;
- absolute-form requests (``GET http://127.0.0.1:PORT/path HTTP/1.1``):
  forwarded in origin form, one request per connection (``Connection:
  close`` both ways);
- any target other than 127.0.0.1, or anything else: 403 / 400, never
  contacted; ``--alias NAME`` (repeatable) makes the host name NAME (any
  case, a trailing dot or not) a target too, reached at 127.0.0.1, so that
  a test can name an upstream by a host name that is no address.

Each request line is appended to ``--log`` as one JSON line
(``{"method", "target", "allowed"}``).  Standard library only; binds
127.0.0.1 on a free port and writes ``{"port": N}`` to ``--ready-file``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

ALLOWED_HOST = "127.0.0.1"
MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 30.0
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
}


class Proxy:
    def __init__(self, log_path: Path, aliases: list[str]) -> None:
        self.log_path = log_path
        self.aliases = {alias.lower().rstrip(".") for alias in aliases}

    def allowed(self, host: str | None) -> bool:
        """Whether *host* is 127.0.0.1, or one of its aliases."""
        if host is None:
            return False
        return host == ALLOWED_HOST or host.lower().rstrip(".") in self.aliases

    def record(self, method: str, target: str, allowed: bool) -> None:
        entry = {"method": method, "target": target, "allowed": allowed}
        with self.log_path.open("a") as log:
            log.write(json.dumps(entry, sort_keys=True) + "\n")

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), timeout=HEAD_TIMEOUT
            )
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        except ConnectionError:
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            await self.refuse(writer, 400, "bad request line")
            return
        method, target, _version = parts
        headers = [line for line in lines[1:] if line]
        if method == "CONNECT":
            await self.tunnel(reader, writer, target)
        elif target.startswith("http://"):
            await self.forward(reader, writer, method, target, headers)
        else:
            self.record(method, target, False)
            await self.refuse(writer, 400, "not a proxy request")

    async def refuse(
        self, writer: asyncio.StreamWriter, status: int, reason: str
    ) -> None:
        body = reason.encode() + b"\n"
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode("latin-1")
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str
    ) -> None:
        host, _, port = target.rpartition(":")
        allowed = self.allowed(host) and port.isdigit()
        self.record("CONNECT", target, allowed)
        if not allowed:
            await self.refuse(writer, 403, "target not allowed")
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                ALLOWED_HOST, int(port)
            )
        except OSError:
            await self.refuse(writer, 502, "cannot connect")
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await self.splice(reader, writer, up_reader, up_writer)

    async def forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        headers: list[str],
    ) -> None:
        url = urlsplit(target)
        allowed = self.allowed(url.hostname) and url.port is not None
        self.record(method, target, allowed)
        if not allowed:
            await self.refuse(writer, 403, "target not allowed")
            return
        assert url.port is not None
        try:
            up_reader, up_writer = await asyncio.open_connection(ALLOWED_HOST, url.port)
        except OSError:
            await self.refuse(writer, 502, "cannot connect")
            return
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        kept = [
            h for h in headers if h.split(":", 1)[0].strip().lower() not in HOP_BY_HOP
        ]
        request = "\r\n".join(
            [f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""]
        )
        up_writer.write(request.encode("latin-1"))
        try:
            response_head = await asyncio.wait_for(
                up_reader.readuntil(b"\r\n\r\n"), timeout=HEAD_TIMEOUT
            )
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            up_writer.close()
            await self.refuse(writer, 502, "no response")
            return
        response_lines = response_head.decode("latin-1").split("\r\n")
        status_line, rest = response_lines[0], [x for x in response_lines[1:] if x]
        rest = [h for h in rest if h.split(":", 1)[0].strip().lower() not in HOP_BY_HOP]
        writer.write(
            "\r\n".join([status_line, *rest, "Connection: close", "", ""]).encode(
                "latin-1"
            )
        )
        await self.splice(reader, writer, up_reader, up_writer)

    async def splice(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter
        ) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    if sink.can_write_eof():
                        sink.write_eof()

        # Upstream closing ends the exchange: the response is complete.
        upward = asyncio.ensure_future(pipe(reader, up_writer))
        await pipe(up_reader, writer)
        upward.cancel()
        for w in (writer, up_writer):
            w.close()


async def serve(options: argparse.Namespace) -> None:
    proxy = Proxy(Path(options.log), options.alias)
    server = await asyncio.start_server(proxy.handle, ALLOWED_HOST, 0, limit=MAX_HEAD)
    port = server.sockets[0].getsockname()[1]
    ready = Path(options.ready_file)
    partial = ready.with_suffix(".partial")
    partial.write_text(json.dumps({"port": port}))
    os.replace(partial, ready)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    await stop
    # Not ``async with``: newer Pythons would wait for open tunnels to end.
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--alias", action="append", default=[])
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
