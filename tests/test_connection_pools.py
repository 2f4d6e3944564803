"""
Which upstreams share persistent connections (issue 16, item 9): only
those that would open the same connection, TLS settings and proxy alike.
The end-to-end counterpart, a real registry reached two ways, is in
``tests/e2e/test_upstream_tls.py``.
"""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool

from regmirror.config import UpstreamConfig
from regmirror.transport import ConnectionPools

PLAIN = UpstreamConfig("plain", "https://registry.example")


def pools() -> ConnectionPools:
    clock = Clock()
    return ConnectionPools(lambda: HTTPConnectionPool(clock, persistent=True))


@pytest.mark.parametrize(
    "changes",
    [
        {"insecure": True},
        {"ca_file": "/etc/regmirror/ca.pem"},
        {"client_cert": "/etc/regmirror/client.pem"},
        {"client_cert": "/c.pem", "client_key": "/k.pem"},
        {"proxy": "http://proxy.example:3128"},
    ],
)
def test_upstreams_reaching_a_host_differently_never_share_connections(
    changes: dict[str, object],
) -> None:
    """
    Two upstreams on the same host, one with other TLS settings (no
    verification, its own CA, a client certificate) or an outbound proxy:
    each has its own pool, so a connection opened one way is never reused
    the other way; nor by the bucket's and the other nodes' agents.
    """
    connections = pools()
    other = attrs.evolve(PLAIN, name="other", **changes)
    assert connections.pool_for(other) is not connections.pool_for(PLAIN)
    assert connections.pool_for(other) is not connections.pool_for(None)


def test_tls_settings_bind_to_the_upstreams_host() -> None:
    """The same client certificate for two upstreams on different hosts:
    each applies it to its own site only, so they do not share."""
    connections = pools()
    first = attrs.evolve(PLAIN, client_cert="/c.pem", ca_file="/ca.pem")
    second = attrs.evolve(first, name="second", url="https://other.example")
    assert connections.pool_for(first) is not connections.pool_for(second)


def test_upstreams_alike_share_one_persistent_pool() -> None:
    """
    The warm path keeps its connections: an upstream always gets the same
    persistent pool, and upstreams that would open the same connections
    (the same settings, names and timeouts aside) share it, as do the
    bucket's and the nodes' agents with upstreams without TLS settings.
    """
    connections = pools()
    pool = connections.pool_for(PLAIN)
    assert pool.persistent
    assert connections.pool_for(PLAIN) is pool
    alike = attrs.evolve(PLAIN, name="alike", connect_timeout=3.0)
    assert connections.pool_for(alike) is pool
    assert connections.pool_for(None) is pool
    secured = attrs.evolve(PLAIN, name="secured", insecure=True)
    assert connections.pool_for(secured) is connections.pool_for(
        attrs.evolve(secured, name="again")
    )
