"""The twistd plugin's options and service maker."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from regmirror.config import ConfigError
from regmirror.service import make_service, validate


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
            self.loaded = validate(self["config"])
        except ConfigError as error:
            # One line and a non-zero exit, before anything listens.
            raise SystemExit(f"regmirror: {error}") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return make_service(options.loaded, reactor)
