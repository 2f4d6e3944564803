"""
The service tree of the parent and of each worker process, as
:func:`regmirror.service.build_tree` builds them, in memory: the same
services, timers and clean stop in both; the machine's metrics and status
totals added up over the channels between them, whichever process answers;
a stopping worker releasing its cluster leases.

Worker processes are not run: the parent's reactor records what it would
spawn, and each worker's tree is built here, in this process, its channel
to the parent connected in memory (``twisted.test.iosim``).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import treq
from configs import write_config
from memory import result
from memory_redis import FakeRedis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect

from regmirror import cluster, service
from regmirror.cluster import Coordinator, Lease
from regmirror.config import Config, restart_needed
from regmirror.ini import load
from regmirror.listeners import AdoptedListener, BoundListener, Inherited
from regmirror.metrics import combine, export, revive, total
from regmirror.reference import Digest
from regmirror.service import (
    HOUSEKEEPING_INTERVAL,
    MirrorService,
    Worker,
    build_tree,
    make_service,
)
from regmirror.status import SAMPLE_INTERVAL
from regmirror.workers import (
    COLLECT_TIMEOUT,
    MAX_RESTART_DELAY,
    RESTART_DELAY,
    SETTLED,
    Parent,
    Workers,
    _Worker,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


def config_of(tmp_path: Path, workers: int = 3, extra: str = "") -> Config:
    return load(str(write_config(tmp_path, f"workers = {workers}", extra)))


class _Process:
    def __init__(self, pid: int, env: dict[str, str]) -> None:
        self.pid = pid
        self.env = env
        self.signals: list[str] = []
        #: what the parent wrote to the worker's standard input
        self.stdin = b""
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        assert not self.stdin_closed
        self.stdin += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _Now:
    """A thread pool that runs the work at once, in this thread."""

    def callInThreadWithCallback(
        self, done: Any, work: Any, *args: Any, **kwargs: Any
    ) -> None:
        try:
            outcome = work(*args, **kwargs)
        except Exception:
            done(False, Failure())
        else:
            done(True, outcome)


class Machine(MemoryReactorClock):
    """A reactor that records the processes it is asked to spawn, and runs
    the work meant for threads at once (the parent's housekeeping)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[_Worker, list[str], _Process]] = []

    def getThreadPool(self) -> _Now:
        return _Now()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], **kwargs: Any
    ) -> _Process:
        process = _Process(1000 + len(self.spawned), kwargs["env"])
        self.spawned.append((protocol, args, process))
        return process


def _worker_place(config: Config) -> Worker:
    """A worker's inherited sockets and channel: real descriptors of this
    process (the tree closes them), of the right kinds."""
    inherited = tuple(
        Inherited(socket.socket().detach(), socket.AF_INET, d)
        for d in config.server.listen
    )
    return Worker(inherited, socket.socket(socket.AF_UNIX).detach())


class Family:
    """A parent and its workers in memory, their channels connected."""

    def __init__(self, tmp_path: Path, monkeypatch: Any, workers: int = 3) -> None:
        monkeypatch.chdir(tmp_path)
        self.config = config_of(tmp_path, workers)
        self.reactor = Machine()
        self.parent = make_service(self.config, self.reactor)
        self.parent.privilegedStartService()
        self.parent.startService()
        self.workers: list[MirrorService] = []
        self.pumps: list[IOPump] = []
        for spawned, args, process in self.reactor.spawned:
            self.connect(spawned, args, process)

    def connect(
        self, spawned: _Worker, args: list[str], process: _Process
    ) -> MirrorService:
        """The tree a worker builds from its arguments and standard input."""
        assert args[1:3] == ["-m", "regmirror.worker"]
        assert process.stdin_closed
        path = args[args.index("-c") + 1]
        config = service.validate(path, process.stdin.decode("utf-8"))
        assert config == self.config
        tree = build_tree(config, self.reactor, _worker_place(config))
        tree.startService()
        link = tree.getServiceNamed("processes")
        assert isinstance(link, Parent)
        self.pumps.append(
            connect(
                spawned.channel,
                FakeTransport(spawned.channel, isServer=True),
                link.channel,
                FakeTransport(link.channel, isServer=False),
                greet=False,
            )
        )
        self.workers.append(tree)
        return tree

    def settle(self, pumps: list[IOPump] | None = None) -> None:
        for _ in range(10):
            for pump in self.pumps if pumps is None else pumps:
                pump.flush()

    def get(self, tree: MirrorService, path: str) -> bytes:
        agent = RequestTraversalAgent(tree.mirror.site.resource)
        d = HTTPClient(agent).get(f"http://mirror.test{path}")
        for _ in range(3):
            agent.flush()
            self.settle()
        response = result(d)
        assert response.code == 200
        body: bytes = result(treq.content(response))
        return body

    def requests_total(self, tree: MirrorService) -> float:
        return requests_in(self.get(tree, "/metrics").decode())


def requests_in(metrics: str) -> float:
    """The sum of ``regmirror_requests_total`` in a ``/metrics`` answer."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith("regmirror_requests_total{")
    )


def count(tree: MirrorService, requests: int, hits: int = 0) -> None:
    """Count *requests* answered and *hits* in *tree*'s process."""
    metrics = tree.mirror.metrics
    metrics.requests.labels("docker.io", "blobs", "GET", "200").inc(requests)
    metrics.cache.labels("blob", "hit").inc(hits)


def test_parent_and_workers_run_the_same_tree(tmp_path: Path, monkeypatch: Any) -> None:
    """
    A worker's tree is the parent's: the same mirror, listeners and status
    history timer on the injected clock; only the parent does the cache's
    housekeeping, keeps images warm, binds its listeners rather than
    adopting them, and runs the workers rather than a link to its parent.
    """
    monkeypatch.chdir(tmp_path)
    config = config_of(tmp_path)
    reactor = Machine()
    parent = make_service(config, reactor)
    worker = build_tree(config, reactor, _worker_place(config))

    def named(tree: MirrorService) -> dict[str, Any]:
        return {service.name: service for service in tree}

    ours, theirs = named(parent), named(worker)
    listener = "listener 0: tcp:0:interface=127.0.0.1"
    assert set(ours) - set(theirs) == {"housekeeping", "keep warm"}
    assert set(theirs) == {"history", listener, "processes"}
    for tree, place in ((ours, "parent"), (theirs, "worker")):
        timers = {n: s for n, s in tree.items() if isinstance(s, TimerService)}
        assert all(t.clock is reactor for t in timers.values()), place
        assert timers["history"].step == SAMPLE_INTERVAL
    assert ours["housekeeping"].step == HOUSEKEEPING_INTERVAL
    assert isinstance(ours[listener], BoundListener)
    assert isinstance(theirs[listener], AdoptedListener)
    assert isinstance(ours["processes"], Workers)
    assert isinstance(theirs["processes"], Parent)
    assert parent.primary and not worker.primary
    # Alone, the parent has no workers to run, and the same tree otherwise.
    alone = make_service(config_of(tmp_path, workers=1), reactor)
    assert set(named(alone)) == set(ours) - {"processes"}


def test_worker_samples_history_and_recovers_upstreams(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """
    A started worker samples the totals for the status page's history every
    ``SAMPLE_INTERVAL`` (its parent away: its own totals) and looks after
    its upstreams marked down; stopped, it leaves no timer behind.
    """
    monkeypatch.chdir(tmp_path)
    config = config_of(tmp_path)
    reactor = MemoryReactorClock()
    tree = build_tree(config, reactor, _worker_place(config))
    tree.startService()
    mirror = tree.mirror
    count(tree, 1, hits=2)
    reactor.advance(SAMPLE_INTERVAL)
    assert [s["hits"] for s in mirror.history.samples] == [0, 2]
    document = result(Deferred.fromCoroutine(mirror.status()))
    assert len(document["history"]) == 2
    assert mirror._recovery.running
    stopped = tree.stopService()
    reactor.advance(0)  # a listening port closes in the next turn
    result(stopped)
    assert not mirror._recovery.running
    assert reactor.getDelayedCalls() == []
    assert reactor.hasStopped is False  # its own stop, not the parent's end


def test_stopping_worker_releases_its_leases(tmp_path: Path, monkeypatch: Any) -> None:
    """A worker's tree, stopped (SIGTERM), gives up its cluster leases at
    once instead of letting them expire, and leaves no timer behind."""
    monkeypatch.chdir(tmp_path)
    config = config_of(
        tmp_path,
        extra="\n[cluster]\nredis = redis://127.0.0.1:9/0\n"
        "advertise = http://127.0.0.1:5000\n",
    )
    reactor = MemoryReactorClock()
    redis = FakeRedis(reactor)
    coordinator = Coordinator(
        reactor, REDIS_URL, "http://127.0.0.1:5000", lease_ttl=3.0, endpoint=redis
    )
    # The tree's coordinator, reaching the fake Redis.
    monkeypatch.setattr(service, "coordinator", lambda cluster, reactor: coordinator)
    tree = build_tree(config, reactor, _worker_place(config))
    assert tree.mirror.coordinator is coordinator
    tree.startService()
    reactor.advance(0)
    lease = result(Deferred.fromCoroutine(coordinator.acquire(Digest.of(b"blob"))))
    assert isinstance(lease, Lease)
    stopped = tree.stopService()
    reactor.advance(0)
    result(stopped)
    assert redis.named(cluster._RELEASE.encode())[0][-1] == lease.value
    assert not any(wire.connected for wire in redis.wires)
    assert reactor.getDelayedCalls() == []


def test_metrics_add_up_every_process_whichever_answers(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """
    ``/metrics`` and the status page's totals are the machine's, asked of
    the parent or of any worker: the parent gathers every worker's families
    over its channel and adds them up with its own.
    """
    family = Family(tmp_path, monkeypatch)
    parent, (one, two) = family.parent, family.workers
    count(parent, 1, hits=1)
    count(one, 2, hits=2)
    count(two, 3, hits=4)
    for tree in (parent, one, two):
        assert family.requests_total(tree) == 6
        status = json.loads(family.get(tree, "/_status.json"))
        assert status["totals"]["hits"] == 7


def test_counts_of_ended_workers_stay(tmp_path: Path, monkeypatch: Any) -> None:
    """
    A worker that stops gives the parent its last counts, which stay in the
    totals after it ended and was restarted: counters never go down.  One
    killed counts as it last reported.
    """
    family = Family(tmp_path, monkeypatch)
    parent, (one, two) = family.parent, family.workers
    count(one, 2)
    count(two, 3)
    assert family.requests_total(parent) == 5
    count(one, 10)  # not reported yet: given when it stops
    stopped = one.stopService()
    family.settle()
    family.reactor.advance(0)
    result(stopped)
    count(two, 100)  # reported, then killed: lost with it
    assert family.requests_total(parent) == 115
    count(two, 1000)  # never reported: lost with it
    for index, (spawned, _, _) in enumerate(family.reactor.spawned):
        reason = ProcessDone(0) if index == 0 else ProcessTerminated(signal=9)
        spawned.processEnded(Failure(reason))
    assert family.requests_total(parent) == 115
    family.reactor.advance(RESTART_DELAY)
    assert len(family.reactor.spawned) == 4
    for spawned, args, process in family.reactor.spawned[2:]:
        count(family.connect(spawned, args, process), 1)
    assert family.requests_total(family.workers[-1]) == 117


def test_silent_worker_counts_as_last_reported(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A worker that does not answer within ``COLLECT_TIMEOUT`` (stopped,
    busy) is counted as it last reported: the scrape is answered anyway."""
    family = Family(tmp_path, monkeypatch)
    parent, (one, two) = family.parent, family.workers
    count(one, 2)
    assert family.requests_total(parent) == 2
    count(one, 5)
    count(two, 3)
    agent = RequestTraversalAgent(parent.mirror.site.resource)
    answered: list[Any] = []
    HTTPClient(agent).get("http://mirror.test/metrics").addBoth(answered.append)
    family.settle([family.pumps[1]])  # the first worker's never moves
    agent.flush()
    assert answered == []
    family.reactor.advance(COLLECT_TIMEOUT)
    agent.flush()
    assert answered[0].code == 200
    body = result(treq.content(answered[0])).decode()
    assert requests_in(body) == 2 + 3
    assert family.requests_total(parent) == 7 + 3


def test_worker_stops_when_its_parent_is_gone(tmp_path: Path, monkeypatch: Any) -> None:
    """A worker whose channel to the parent ends (the parent was killed)
    stops its reactor, rather than serving on as an orphan."""
    family = Family(tmp_path, monkeypatch)
    assert family.reactor.hasStopped is False
    spawned, _, _ = family.reactor.spawned[0]
    assert spawned.channel.transport is not None
    spawned.channel.transport.loseConnection()
    family.settle()
    assert family.reactor.hasStopped is True


class _Certificate:
    """Stands for a listener's certificate: counts its reloads."""

    def __init__(self, reloads: list[int], number: int) -> None:
        self._reloads = reloads
        self._number = number

    def reload(self) -> None:
        self._reloads.append(self._number)


def test_sighup_reaches_every_worker_over_its_channel(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """
    The parent's reload (SIGHUP) asks every worker to reload over its
    channel, never by a signal: SIGHUP's default action ended a worker
    still starting, before its handler was installed ("ended by signal 1",
    then restarted).  A worker reads the question once it serves, and
    reloads once.
    """
    family = Family(tmp_path, monkeypatch)
    reloads: list[int] = []
    for number, tree in enumerate(family.workers):
        tree.certificates.append(_Certificate(reloads, number))
    family.parent.reload()
    assert reloads == []  # nothing read yet: as a worker still starting
    family.settle()
    assert sorted(reloads) == [0, 1]
    assert [process.signals for _, _, process in family.reactor.spawned] == [[], []]


def _family(name: str, samples: list[tuple[dict[str, str], float]]) -> Metric:
    metric = GaugeMetricFamily(name, "a gauge", labels=["upstream"])
    for labels, value in samples:
        metric.add_metric(list(labels.values()), value)
    return metric


def test_combine_adds_counters_and_takes_gauges_by_their_rule() -> None:
    """Counters add up, their ``_created`` is the earliest; downloads in
    flight add up; an upstream is down if it is down in any process; the
    cache's size is the first process's; samples survive JSON."""
    processes: list[list[Metric]] = []
    for created, value, down in ((20.0, 1.0, 0.0), (10.0, 2.0, 1.0)):
        counter = CounterMetricFamily(
            "regmirror_requests", "requests", labels=["status"], created=created
        )
        counter.add_metric(["200"], value, created=created)
        processes.append(
            [
                counter,
                _family("regmirror_upstream_down", [({"upstream": "one"}, down)]),
                GaugeMetricFamily("regmirror_downloads_in_flight", "d", value=value),
                GaugeMetricFamily("regmirror_cache_size_bytes", "s", value=value),
            ]
        )
    combined = revive(export(combine(revive(export(p)) for p in processes)))
    assert total(combined, "regmirror_requests_total", status="200") == 3
    assert total(combined, "regmirror_requests_created") == 10
    assert total(combined, "regmirror_upstream_down", upstream="one") == 1
    assert total(combined, "regmirror_downloads_in_flight") == 3
    assert total(combined, "regmirror_cache_size_bytes") == 1


def test_a_worker_runs_the_text_the_parent_loaded(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """
    A worker, restarted too, is given the configuration's text as the
    parent read it at start, on its standard input, whatever the file says
    since: not the file's name alone (an edited file would make it another
    mirror, a broken one none).  Its inline secrets are neither in the
    worker's arguments nor in its environment.
    """
    monkeypatch.chdir(tmp_path)
    secret = "inline-secret-3e9a"
    path = write_config(
        tmp_path,
        "workers = 2",
        "\n[upstream:two]\nurl = http://127.0.0.1:9\nusername = u\n"
        f"password = {secret}\n",
    )
    config = load(str(path))
    reactor = Machine()
    parent = make_service(config, reactor)
    parent.privilegedStartService()
    parent.startService()
    path.write_text("[server\nbroken\n")
    ((worker, _, process),) = reactor.spawned
    worker.processEnded(Failure(ProcessTerminated(signal=9)))
    reactor.advance(RESTART_DELAY)
    for _, args, process in reactor.spawned:
        assert process.stdin.decode("utf-8") == config.text
        assert process.stdin_closed
        assert service.validate(args[args.index("-c") + 1], config.text) == config
        assert not any(secret in arg for arg in args)
        assert not any(secret in value for value in process.env.values())
    assert len(reactor.spawned) == 2
    stopping = parent.stopService()
    reactor.spawned[-1][0].processEnded(Failure(ProcessDone(0)))
    reactor.advance(0)
    result(stopping)


def test_a_worker_that_keeps_dying_at_start_is_restarted_less_often(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """
    A worker that dies soon after its start (a certificate file broken
    since twistd started, say) is restarted after RESTART_DELAY, then twice
    as long each time, up to MAX_RESTART_DELAY, rather than every second
    for ever; once one has run SETTLED, the next is restarted after
    RESTART_DELAY again.
    """
    monkeypatch.chdir(tmp_path)
    reactor = Machine()
    parent = make_service(config_of(tmp_path, workers=2), reactor)
    parent.privilegedStartService()
    parent.startService()

    def dies_after(ran: float) -> float:
        """The last worker dies after *ran* s: the wait until the next."""
        reactor.advance(ran)
        spawned = len(reactor.spawned)
        reactor.spawned[-1][0].processEnded(Failure(ProcessTerminated(1)))
        waited = 0.0
        while len(reactor.spawned) == spawned:
            reactor.advance(0.5)
            waited += 0.5
            assert waited <= MAX_RESTART_DELAY
        return waited

    assert [dies_after(0.1) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert dies_after(SETTLED) == RESTART_DELAY
    assert dies_after(0.1) == 2 * RESTART_DELAY
    stopping = parent.stopService()
    reactor.spawned[-1][0].processEnded(Failure(ProcessDone(0)))
    reactor.advance(0)
    result(stopping)


def test_sighup_reads_the_file_again_and_says_what_waits_for_a_restart(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """
    SIGHUP in the ``twistd`` process reads the configuration file again:
    the keep_warm lists are taken, and every other change is named in a
    warning, as waiting for a restart (a changed ``deny`` was silently
    ignored); a file that does not load changes nothing, and says so.
    """
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path)
    reactor = Machine()
    parent = make_service(load(str(path)), reactor)
    parent.privilegedStartService()
    parent.startService()
    assert parent.warm is not None
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        write_config(tmp_path, extra="deny = */*-debug\nkeep_warm = app:v1\n")
        parent.reload()
        path.write_text("[cache\nno INI at all\n")
        parent.reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [formatEvent(e) for e in events]
    waiting = [line for line in said if "a restart does" in line]
    assert len(waiting) == 1, said
    assert waiting[0].endswith(": [namespace:docker.io] deny"), waiting
    assert [s["image"] for s in parent.warm.states()] == ["library/app:v1"]
    assert any("configuration file not read again" in line for line in said), said
    result(parent.stopService())


def test_restart_needed_names_sections_and_keys(tmp_path: Path) -> None:
    """Each key that differs, a section added or removed; never the keys
    SIGHUP takes (keep_warm, keep_warm_interval)."""
    old = load(str(write_config(tmp_path)))
    new = load(
        str(
            write_config(
                tmp_path,
                server="workers = 2",
                extra="keep_warm = app:v1\nkeep_warm_interval = 1h\ntag_ttl = 5m\n"
                "\n[upstream:two]\nurl = http://127.0.0.1:8\n",
            )
        )
    )
    assert restart_needed(old, new) == [
        "[server] workers",
        "[upstream:two]",
        "[namespace:docker.io] tag_ttl",
    ]
    assert restart_needed(old, old) == []
