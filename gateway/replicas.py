"""Stage replicas: one per pod address, with its own channel, health, load and ServerInfo, and the
gateway's queue of requests waiting for a replica with room.

Every target is re-resolved every `resolve_interval_s` and at once after a failure: a pod that
appears behind the name gets a replica, one that vanished stops getting requests and is closed when
its last request ends. Each replica's health and ServerInfo (with its load) are polled every
`interval_s`; a draining pod (NOT_SERVING) gets no new requests. When the TLS files change, every
replica moves to a new channel made with them, and the old one is retired the same way.

Backpressure lives here: `lease()` waits, in request arrival order and within the deadline, for a
SERVING replica with room, room being the capacity the replica reports (planner: plans in flight;
decoder: denoising slots, plus `lookahead` requests bound ahead so that the next one is ready when
a slot frees) less the requests this gateway has on it. A replica that still answers
RESOURCE_EXHAUSTED (other gateways share it) gets nothing more until its next poll.
"""

import asyncio
import bisect
import gc
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import metrics
from gateway.discovery import Target
from glmimage.v1 import common_pb2
from servekit.errors import DeadlineExceeded
from servekit.tls import ChannelTLS
from servekit.validation import Limits, max_message_bytes

logger = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    # Notice a dead replica within seconds, even between calls.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect to a restarted replica quickly.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class Replica:
    """One pod: `address` is a gRPC channel target such as `ipv4:10.0.0.5:50052`."""

    def __init__(self, stage: str, address: str, target: Target, stub_class, credentials, lookahead: int,
                 max_message_bytes: int):  # fmt: skip
        self.stage = stage
        self.address = address
        self.target = target
        self.lookahead = lookahead
        # condition images travel inside requests: as large as the request limits allow
        options: list[tuple[str, str | int]] = [
            *CHANNEL_OPTIONS, ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]  # fmt: skip
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            if target.is_name:  # certificates name the Service, not the pod's IP
                options += [("grpc.ssl_target_name_override", target.host), ("grpc.default_authority", str(target))]
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.stub = stub_class(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.serving = False
        self.full = False  # answered RESOURCE_EXHAUSTED: no more requests until the next poll
        self.retired = False  # gone from the name: no new requests, closed once idle
        self.outstanding = 0  # requests this gateway has on it
        self.best_effort = 0  # previews this gateway has on it (they take no room: the replica drops them)
        self.leased_at = 0.0  # ties go to the least recently used replica
        self.info: common_pb2.ServerInfo | None = None

    @property
    def host_port(self) -> str:
        return self.address.split(":", 1)[1]

    def room(self) -> int:
        if not self.serving or self.full or self.retired or self.info is None:
            return 0
        return self.info.load.capacity + self.lookahead - self.outstanding

    async def poll(self, timeout_s: float) -> None:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            if serving:
                self.info = await self.stub.GetServerInfo(common_pb2.GetServerInfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            serving = False
        if serving != self.serving:
            logger.info("%s %s is %s", self.stage, self.host_port, "SERVING" if serving else "not serving")
            if not serving:
                self.info = None  # a replica that comes back may run another version
        self.serving = serving
        self.full = False

    def mark_failed(self) -> None:
        """Out of rotation until its next health check passes."""
        self.serving = False


def _busyness(replica: Replica) -> tuple[float, int, float]:
    """The dispatch order of replicas with room (so with a ServerInfo): requests of this gateway's per unit
    of capacity, then the replica's own load, then the least recently used."""
    info = replica.info
    assert info is not None  # room() > 0
    return (replica.outstanding / max(info.load.capacity, 1), info.load.active + info.load.waiting, replica.leased_at)


@dataclass(order=True)
class _Waiter:
    order: tuple[float, int]
    future: asyncio.Future = field(compare=False)
    avoid: frozenset = field(compare=False)


class ReplicaPool:
    def __init__(self, stage: str, targets: list[str], stub_class, tls: ChannelTLS | None, interval_s: float,
                 resolve_interval_s: float, lookahead: int = 0,
                 max_message_bytes: int = max_message_bytes(Limits())):  # fmt: skip
        self.stage = stage
        self.targets = [Target.parse(t) for t in targets]
        self.replicas: dict[str, Replica] = {}
        self._retired: set[Replica] = set()
        self._stub_class = stub_class
        self._tls = tls
        self._tls_generation = tls.generation if tls else 0  # the credentials the replicas' channels use
        self._lookahead = lookahead
        self._max_message_bytes = max_message_bytes
        self.interval_s = interval_s
        self.resolve_interval_s = resolve_interval_s
        self._poller: asyncio.Task | None = None
        self._checked = asyncio.Event()
        self._resolve_now = asyncio.Event()
        self._waiters: list[_Waiter] = []
        self._tiebreak = itertools.count()
        self._waiting_gauge = metrics.STAGE_WAITING.labels(stage)
        self._in_service_gauge = metrics.STAGE_IN_SERVICE.labels(stage)

    # ------------------------------------------------------------ membership and health
    async def _resolve(self) -> None:
        found: dict[str, Target] = {}
        for target in self.targets:
            try:
                for address in await target.resolve():
                    found[address] = target
            except OSError as error:
                # keep what we had: a DNS hiccup must not empty the pool
                logger.warning("%s: cannot resolve %s (%s); keeping %d known replicas", self.stage, target, error,
                               len(self.replicas))  # fmt: skip
                return
        for address in sorted(found.keys() - self.replicas.keys()):
            logger.info("%s: new replica %s (behind %s)", self.stage, address, found[address])
            self.replicas[address] = self._new_replica(address, found[address])
        for address in self.replicas.keys() - found.keys():
            logger.info("%s: replica %s left its name; closing it once idle", self.stage, address)
            await self._retire(self.replicas.pop(address))

    def _new_replica(self, address: str, target: Target) -> Replica:
        credentials = self._tls.credentials if self._tls else None
        return Replica(self.stage, address, target, self._stub_class, credentials, self._lookahead,
                       self._max_message_bytes)  # fmt: skip

    async def _retire(self, replica: Replica) -> None:
        """No new requests; the channel closes when its last request ends."""
        replica.retired = True
        self._retired.add(replica)
        await self._close_if_idle(replica)

    async def _renew_channels(self) -> None:
        """A channel keeps the certificates it was made with: after the TLS files change, each replica
        is replaced by one on a new channel (new connections, new certificates), polled before it gets
        requests, and the old one is retired so that its requests finish on the old connection."""
        assert self._tls is not None  # called only with TLS
        self._tls.refresh()
        if self._tls.generation == self._tls_generation:
            return
        self._tls_generation = self._tls.generation
        logger.info("%s: TLS files changed; reconnecting to %d replicas", self.stage, len(self.replicas))
        for address, replica in list(self.replicas.items()):
            self.replicas[address] = self._new_replica(address, replica.target)
            await self._retire(replica)

    async def _close_if_idle(self, replica: Replica) -> None:
        if replica.retired and replica.outstanding == replica.best_effort == 0 and replica in self._retired:
            self._retired.discard(replica)
            await replica.channel.close()
            # A finished stream call can outlive close() in a reference cycle (grpc's response iterator
            # holds its call), keeping the connection open until the collector runs: collect now, so the
            # connection closes with the replica (its certificates may just have been replaced).
            gc.collect()

    async def _poll_forever(self) -> None:
        resolved_at = -float("inf")
        while True:
            if self._tls is not None:
                await self._renew_channels()
            if self._resolve_now.is_set() or time.monotonic() - resolved_at >= self.resolve_interval_s:
                self._resolve_now.clear()
                resolved_at = time.monotonic()
                await self._resolve()
            replicas = list(self.replicas.values())
            await asyncio.gather(*(r.poll(timeout_s=max(self.interval_s, 1.0)) for r in replicas))
            self._checked.set()
            self._dispatch()
            try:
                await asyncio.wait_for(self._resolve_now.wait(), self.interval_s)
            except TimeoutError:
                pass

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_forever())

    async def wait_serving(self) -> None:
        while not self.serving():
            self._checked.clear()
            await self._checked.wait()

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.serving]

    def failed(self, replica: Replica) -> None:
        """A call on `replica` failed: out of rotation until it passes a health check; re-resolve now
        (the pod may have been replaced under the same name)."""
        replica.mark_failed()
        self._resolve_now.set()

    def overloaded(self, replica: Replica) -> None:
        replica.full = True

    def infos(self) -> list[tuple[Replica, common_pb2.ServerInfo | None]]:
        return [(r, r.info) for r in self.replicas.values()]

    # ------------------------------------------------------------ the queue
    def _dispatch(self) -> None:
        """Hands free room to waiters, first come first served."""
        while self._waiters:
            waiter = self._waiters[0]
            candidates = [r for r in self.replicas.values() if r.room() > 0]
            if not candidates:
                break
            fresh = [r for r in candidates if r.address not in waiter.avoid]
            # the fewest requests per unit of capacity: the one that will be free soonest
            best = min(fresh or candidates, key=_busyness)
            self._waiters.pop(0)
            best.outstanding += 1
            best.leased_at = time.monotonic()
            waiter.future.set_result(best)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._waiting_gauge.set(len(self._waiters))
        in_service = sum(r.outstanding for r in self.replicas.values()) + sum(r.outstanding for r in self._retired)
        self._in_service_gauge.set(in_service)

    async def lease(self, arrival: float, avoid: set[str], deadline: float) -> Replica:
        """A SERVING replica with room, once this request's turn comes (requests that arrived at the
        gateway earlier go first). The caller must `release()` it."""
        future = asyncio.get_running_loop().create_future()
        waiter = _Waiter((arrival, next(self._tiebreak)), future, frozenset(avoid))
        bisect.insort(self._waiters, waiter)
        self._dispatch()
        started = time.monotonic()
        granted = False
        try:
            replica = await asyncio.wait_for(asyncio.shield(future), max(deadline - time.monotonic(), 0.0))
            granted = True
            return replica
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self.stage}: the deadline passed after {time.monotonic() - started:.1f} s waiting for a replica "
                f"with room ({len(self.serving())} SERVING)",
                stage=self.stage,
            ) from None
        finally:
            if not granted and future.done() and not future.cancelled():
                self.release(future.result())  # granted just as the wait ended
            elif not granted:
                future.cancel()
                self._waiters.remove(waiter)
            self._update_gauges()

    def release(self, replica: Replica) -> None:
        replica.outstanding -= 1
        if replica.retired:
            asyncio.ensure_future(self._close_if_idle(replica))
        self._dispatch()

    def lease_best_effort(self) -> Replica | None:
        """For best-effort work that never waits (a preview): the SERVING replica with the fewest
        requests of this gateway's on it and no best-effort work of its own yet, or None. The replica
        itself refuses it at once when it is busy. Release with `release_best_effort()`."""
        candidates = [r for r in self.replicas.values() if r.best_effort == 0 and r.serving and not r.retired]
        if not candidates:
            return None
        replica = min(candidates, key=lambda r: (r.outstanding, r.leased_at))
        replica.best_effort += 1
        replica.leased_at = time.monotonic()
        return replica

    def release_best_effort(self, replica: Replica) -> None:
        replica.best_effort -= 1
        if replica.retired:
            asyncio.ensure_future(self._close_if_idle(replica))

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()  # and wait: no health check may start on a closed channel
            await asyncio.gather(self._poller, return_exceptions=True)
        for waiter in self._waiters:
            waiter.future.cancel()
        replicas = [*self.replicas.values(), *self._retired]
        await asyncio.gather(*(r.channel.close() for r in replicas), return_exceptions=True)
