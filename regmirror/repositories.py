"""
Which repositories a namespace serves: ``[namespace:NAME] allow`` and
``deny``.

Both are shell-style globs of repository names, matched as
:func:`fnmatch.fnmatchcase` does: case-sensitively (names are lower-case
by the grammar anyway), ``*`` any characters, ``/`` included
(``library/*`` matches ``library/a/b``), ``?`` one, ``[...]`` one of a
set.  They see the full name the upstream is asked for, after routing:
without the namespace's prefix, with ``library/`` added to Docker Hub's
one-word names (``busybox`` is ``library/busybox``), whichever way the
request named the namespace (``ns``, ``Host``, path prefix, default).

With ``allow``, a name must match one of its globs; a name matching one of
``deny``'s is refused, whatever ``allow`` says.  A refused repository is
refused before anything is done for it (:mod:`regmirror.http.api`): no
upstream is asked, no cache read, nothing pulled ahead.

In a namespace with either list, content by digest is vouched for per
repository, not for the whole namespace (:meth:`UpstreamPool.voucher`,
:mod:`regmirror.vouches`): a digest is served through an allowed
repository only when that repository references it, or its upstream
confirms that it has it there, never because another repository of the
namespace, allowed or refused, brought it into the cache.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from regmirror.config import NamespaceConfig
from regmirror.errors import Denied

__all__ = ["check", "refusal", "restricted"]


def restricted(namespace: NamespaceConfig) -> bool:
    """Does *namespace* serve only some repositories (``allow`` or
    ``deny`` given)?"""
    return bool(namespace.allow or namespace.deny)


def refusal(namespace: NamespaceConfig, repository: str) -> str | None:
    """
    Why *namespace* refuses *repository* (its full name, as routed), naming
    the rule; ``None`` when it serves it.
    """
    where = f"[namespace:{namespace.name}]"
    for pattern in namespace.deny:
        if fnmatchcase(repository, pattern):
            return f"{repository} is refused by {where} deny = {pattern}"
    if namespace.allow and not any(
        fnmatchcase(repository, pattern) for pattern in namespace.allow
    ):
        listed = " ".join(namespace.allow)
        return (
            f"{repository} is refused by {where} allow = {listed} "
            "(it matches none of them)"
        )
    return None


def check(namespace: NamespaceConfig, repository: str) -> None:
    """
    :raises Denied: (403 ``DENIED``) when *namespace* refuses *repository*.
    """
    why = refusal(namespace, repository)
    if why is not None:
        raise Denied(why)
