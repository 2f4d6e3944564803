"""
The cluster's engines as the tests start them: Redis answers and survives
a restart at the same address.
"""

from __future__ import annotations

import socket

from .engines import RedisServer


def test_redis_answers_ping(redis: RedisServer) -> None:
    """The session's Redis answers PING at the URL it advertises."""
    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    assert redis.command("PING") == b"PONG"


def test_redis_is_flushed_before_each_test(redis: RedisServer) -> None:
    """A test starts with an empty Redis, and values round-trip."""
    assert redis.command("DBSIZE") == 0
    assert redis.command("SET", "lease", "worker-1") == b"OK"
    assert redis.command("GET", "lease") == b"worker-1"


def test_redis_restarts_on_the_same_port(redis: RedisServer) -> None:
    """
    Stopped, Redis refuses connections; started again it answers on the
    same port, empty (no persistence).
    """
    port = redis.port
    redis.command("SET", "key", "value")
    redis.stop()
    assert not redis.running
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    redis.start()
    assert redis.port == port
    assert redis.command("PING") == b"PONG"
    assert redis.command("GET", "key") is None


def test_redis_is_running_after_a_test_stopped_it(redis: RedisServer) -> None:
    """The ``redis`` fixture starts the server again if a test left it stopped."""
    redis.stop()


def test_redis_runs_again_for_the_next_test(redis: RedisServer) -> None:
    """Follows the test above: the fixture started Redis again."""
    assert redis.running
    assert redis.command("PING") == b"PONG"
