"""
A slow link for the benchmark: a TCP relay on 127.0.0.1 that forwards every
connection to a target on loopback, each direction of each connection
limited to a fixed rate.

    .venv/bin/python benchmarks/relay.py --port PORT --target PORT [--mib-s 10]

It stands for a far-away upstream, whose every connection is slow however
many there are (a CDN from the other side of the world, a busy domestic
mirror): the limit is per connection, not for the relay as a whole.
``bench.py --only slow`` starts it between the servers under test and the
upstream registry.  It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

LOCALHOST = "127.0.0.1"
MIB = 1024 * 1024
#: Bytes forwarded at a time: small against the rate, so that the pace is
#: even within a fraction of a second, large enough to cost little CPU.
STEP = 64 * 1024


async def pace(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float
) -> None:
    """
    Copy *reader* to *writer* until its end, never ahead of *rate* bytes
    per second since the first byte (a token bucket that starts empty and
    holds at most one step, so that no burst follows an idle moment).
    """
    loop = asyncio.get_running_loop()
    allowed_at = loop.time()
    try:
        while True:
            data = await reader.read(STEP)
            if not data:
                break
            now = loop.time()
            allowed_at = max(allowed_at, now - STEP / rate)
            allowed_at += len(data) / rate
            if allowed_at > now:
                await asyncio.sleep(allowed_at - now)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: int,
    rate: float,
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            LOCALHOST, target
        )
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(
            pace(client_reader, upstream_writer, rate),
            pace(upstream_reader, client_writer, rate),
        )
    finally:
        for writer in (client_writer, upstream_writer):
            writer.close()


async def serve(port: int, target: int, rate: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(
        lambda r, w: relay(r, w, target, rate), LOCALHOST, port
    )
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument(
        "--mib-s", type=float, default=10.0, help="per connection and direction"
    )
    options = parser.parse_args(argv)
    asyncio.run(serve(options.port, options.target, options.mib_s * MIB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
