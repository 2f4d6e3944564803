"""twistd plugin: ``twistd regmirror -c etc/mirror.ini``."""

from twisted.application.service import ServiceMaker

regmirror = ServiceMaker(
    "regmirror",
    "regmirror.tap",
    "A pull-through cache for several container registries at once.",
    "regmirror",
)
