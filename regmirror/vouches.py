"""
Which namespaces vouch for which content.

Bytes are stored once, by digest (:mod:`regmirror.store`), whichever
namespace fetched them; they are served through a namespace only when that
namespace vouches for them:

- its upstream gave them (a download, a manifest fetched through it);
- a manifest it vouches for references them (an image's config and
  layers, an index's manifests);
- its origin (or, without the origin, one of its mirrors or its own tag
  record) named them for a tag;
- its upstream confirmed that it has them (a ``HEAD`` with the namespace's
  credentials), asked because another namespace cached them: a registry's
  answer for the digest only, never any 2xx
  (:meth:`regmirror.pool.UpstreamPool.blob_size`,
  :meth:`~regmirror.pool.UpstreamPool.confirm_manifest`).

Who vouches is the namespace, or, in a namespace with ``allow`` or
``deny`` (:mod:`regmirror.repositories`), the namespace's repository:
:meth:`UpstreamPool.voucher` names it (``docker.io``, ``docker.io
library/app``), and every rule above then holds per repository: a manifest
served through ``library/app`` makes ``library/app`` vouch for what it
references, a ``HEAD`` asks the upstream about ``library/app``.  So a
digest that a refused repository, or another allowed one, brought into
the cache (before the rules were set, say) is served through an allowed
repository only once it references it or its upstream confirms it there.
Namespaces without rules keep the cheaper whole-namespace record: one
``HEAD`` per repository for shared content is the price of the rules,
paid only where they are set.

The record is the store's (:meth:`Store.vouchers`): a file per digest
beside the content, shared by every process using the cache folder and
kept across restarts, removed with the content; records of content that
never arrived (a layer of an image nobody pulled) are swept after a while
(:meth:`Store.expire_vouches`).  A bounded memory of the answers found
spares the disk on the warm path: a cached blob served again through the
same namespace costs no disk access for this.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from attrs import define, field

from regmirror.reference import Digest, descriptors, parse_digest
from regmirror.store import Store

#: How many ``(namespace, digest)`` answers each process remembers (a few
#: hundred bytes each).
MAX_REMEMBERED = 20_000
#: Records of content that is not in the cache are removed after this long.
UNUSED_RECORD_AGE = 86400.0


class _Recent:
    """A set of at most :data:`MAX_REMEMBERED` pairs, the oldest used out first."""

    def __init__(self) -> None:
        # Kept as text: a third of the memory of a tuple with a Digest.
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, pair: tuple[str, Digest]) -> bool:
        key = f"{pair[0]} {pair[1]}"
        if key not in self._keys:
            return False
        self._keys.move_to_end(key)
        return True

    def add(self, pair: tuple[str, Digest]) -> None:
        key = f"{pair[0]} {pair[1]}"
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > MAX_REMEMBERED:
            self._keys.popitem(last=False)


@define(eq=False)
class Vouches:
    """The record of who vouches for what, read through a bounded memory."""

    store: Store
    #: ``(namespace, digest)`` known to be vouched for
    _known: _Recent = field(factory=_Recent)
    #: ``(namespace, manifest)`` whose references are recorded too
    _expanded: _Recent = field(factory=_Recent)

    def __len__(self) -> int:
        return len(self._known)

    def has(self, namespace: str, digest: Digest) -> bool:
        """Does *namespace* vouch for *digest*?  Memory first, then the record."""
        key = (namespace, digest)
        if key in self._known:
            return True
        try:
            found = namespace in self.store.vouchers(digest)
        except OSError:
            return False
        if found:
            self._known.add(key)
        return found

    def remember(self, namespace: str, digest: Digest) -> None:
        """Remember in this process only (the record is written elsewhere,
        later, or cannot be)."""
        self._known.add((namespace, digest))

    def add(self, namespace: str, digests: Iterable[Digest]) -> None:
        """*namespace* vouches for *digests*: remembered and recorded."""
        for digest in digests:
            self._known.add((namespace, digest))
            if not self.store.writable():
                continue
            try:
                if namespace not in self.store.vouchers(digest):
                    self.store.vouch(digest, namespace)
            except OSError as error:
                self.store.degrade(error)

    def add_manifest(self, namespace: str, digest: Digest, body: bytes) -> None:
        """
        *namespace* vouches for a manifest (served through it, or fetched),
        and so for what it references.  Once per manifest and process while
        remembered: a manifest vouched for by its index has its own
        references recorded when it is first served.
        """
        key = (namespace, digest)
        if key in self._expanded:
            return
        self.add(namespace, [*references(body), digest])
        self._expanded.add(key)


def references(body: bytes) -> list[Digest]:
    """
    The digests a manifest's content consists of: an image's config and
    layers, an index's manifests (an artifact's ``blobs`` too); not its
    ``subject``, which it only points at.  Nothing for a body that is not
    such a document.
    """
    found = []
    for descriptor in descriptors(body, "layers", "manifests", "blobs"):
        try:
            found.append(parse_digest(str(descriptor.get("digest"))))
        except Exception:  # a malformed entry references nothing
            continue
    return found
