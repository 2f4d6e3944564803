"""
A worker process (``python -m regmirror.worker``), started by the parent's
:class:`regmirror.workers.Workers`: the parent's service tree, serving the
listening sockets it inherited, until SIGTERM or the parent's end.

Its configuration is the text the parent loaded, read from standard input
to its end; ``-c`` names the file it came from, against whose folder
relative paths resolve.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from twisted.logger import Logger

from regmirror.listeners import Inherited

log = Logger(namespace="regmirror.workers")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, log to standard output, serve, stop cleanly."""
    parser = argparse.ArgumentParser(prog="python -m regmirror.worker")
    parser.add_argument(
        "-c",
        "--config",
        required=True,
        help="the configuration file the text on standard input was read from",
    )
    parser.add_argument(
        "--listeners",
        required=True,
        help="JSON: [[descriptor, address family, endpoint description], ...]",
    )
    parser.add_argument(
        "--channel", required=True, type=int, help="the socket to the parent"
    )
    # Until MirrorService installs its own: SIGHUP's default action would
    # end a worker still starting (the parent asks workers to reload over
    # their channel; this is for a signal sent to the process group).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    arguments = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    # Until the reactor runs and handles it: SIGTERM stops it as soon as
    # it does, rather than ending this process before its tree stopped.
    signal.signal(
        signal.SIGTERM,
        lambda *_: reactor.callFromThread(reactor.stop),  # type: ignore[attr-defined]
    )

    from regmirror.config import ConfigError
    from regmirror.logs import worker_lines
    from regmirror.service import Worker, build_tree, validate

    # The parent reads these lines and logs them as its own.
    globalLogBeginner.beginLoggingTo([worker_lines(sys.stdout)])
    inherited = tuple(
        Inherited(fd, family, description)
        for fd, family, description in json.loads(arguments.listeners)
    )
    text = sys.stdin.buffer.read().decode("utf-8")
    try:
        config = validate(arguments.config, text)
    except ConfigError as error:
        # The parent's text passed; a file it names has changed since.
        log.critical(
            "worker {pid} cannot start: {error}", pid=os.getpid(), error=str(error)
        )
        sys.exit(1)
    tree = build_tree(config, reactor, Worker(inherited, arguments.channel))
    tree.startService()
    # SIGTERM stops the reactor; the tree stops before it does.
    reactor.addSystemEventTrigger("before", "shutdown", tree.stopService)
    reactor.addSystemEventTrigger(
        "after", "shutdown", lambda: log.info("worker {pid} stopped", pid=os.getpid())
    )
    log.info("worker {pid} serving", pid=os.getpid())
    reactor.run()


if __name__ == "__main__":
    main()
