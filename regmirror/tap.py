"""The twistd plugin's options and service maker."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from regmirror import config as _config
from regmirror.service import (
    check_cache,
    check_listeners,
    check_upstreams,
    make_service,
)


class Options(usage.Options):
    synopsis = "-c CONFIG"
    longdesc = (
        "A pull-through cache for several container registries at once. "
        "Every setting lives in the INI file named by --config; see "
        "README.rst for its reference."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "Path to the INI configuration file (e.g. etc/mirror.ini).",
        ],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            loaded = _config.load(self["config"])
        except _config.ConfigError as error:
            # One line and a non-zero exit, before anything listens.
            raise SystemExit(f"regmirror: {error}") from None
        try:
            check_upstreams(loaded)
        except _config.ConfigError as error:
            raise SystemExit(f"regmirror: {error}") from None
        for check, section, key in (
            (check_listeners, "server", "listen"),
            (check_cache, "cache", "directory"),
        ):
            try:
                check(loaded)
            except ValueError as error:
                located = _config.ConfigError(loaded.path, section, key, str(error))
                raise SystemExit(f"regmirror: {located}") from None
        self.loaded = loaded


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return make_service(options.loaded, reactor)
