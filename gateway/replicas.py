"""Stage replicas: one gRPC channel per configured target, its health, and its load from here.

A target is what gRPC's own name resolution takes: `host:port`, or `dns:///name:port` for a
Kubernetes headless Service. Within a target that resolves to several pods, gRPC's round_robin
policy with client-side health checking spreads calls over the SERVING pods. Across targets, the
gateway picks the SERVING one with the fewest requests outstanding from this gateway.
"""

import asyncio
import json
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glmimage.v1 import common_pb2

logger = logging.getLogger(__name__)

SERVICE_CONFIG = json.dumps(
    {
        # Spread calls over every address a target resolves to, skipping pods whose
        # grpc.health.v1 status is not SERVING.
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
)
CHANNEL_OPTIONS = [
    ("grpc.service_config", SERVICE_CONFIG),
    # Condition images travel inside requests and images come back in <= 1 MiB chunks.
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
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
    def __init__(self, stage: str, target: str, stub_class, credentials: grpc.ChannelCredentials | None):
        self.stage = stage
        self.target = target
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self.stub = stub_class(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.serving = False
        self.outstanding = 0
        self.info: common_pb2.ServerInfo | None = None

    async def poll(self, timeout_s: float) -> None:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            if serving and self.info is None:
                self.info = await self.stub.GetServerInfo(common_pb2.GetServerInfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            serving = False
        if serving != self.serving:
            logger.info("%s %s is %s", self.stage, self.target, "SERVING" if serving else "not serving")
            if not serving:
                self.info = None  # a replica that comes back may run another version
        self.serving = serving

    def mark_failed(self) -> None:
        """Out of rotation until its next health check passes."""
        self.serving = False


class ReplicaPool:
    def __init__(self, stage: str, targets: list[str], stub_class, credentials, interval_s: float):
        self.stage = stage
        self.replicas = [Replica(stage, t, stub_class, credentials) for t in targets]
        self.interval_s = interval_s
        self._poller: asyncio.Task | None = None
        self._checked = asyncio.Event()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(r.poll(timeout_s=max(self.interval_s, 1.0)) for r in self.replicas))
            self._checked.set()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_forever())

    async def wait_serving(self) -> None:
        while not any(r.serving for r in self.replicas):
            self._checked.clear()
            await self._checked.wait()

    def choose(self, tried: set[Replica]) -> Replica | None:
        """The SERVING replica with the fewest outstanding requests, preferring untried ones."""
        serving = [r for r in self.replicas if r.serving]
        fresh = [r for r in serving if r not in tried]
        candidates = fresh or serving
        return min(candidates, key=lambda r: r.outstanding) if candidates else None

    def infos(self) -> list[tuple[str, common_pb2.ServerInfo | None]]:
        return [(r.target, r.info) for r in self.replicas]

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
        await asyncio.gather(*(r.channel.close() for r in self.replicas), return_exceptions=True)
