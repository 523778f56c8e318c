"""Server lifecycle shared by the three services.

start: gRPC server up (health NOT_SERVING, "liveness" SERVING) -> load + warm up the engine off the
event loop -> SERVING. SIGTERM/SIGINT: NOT_SERVING (leave rotation) -> in-flight calls finish within
the grace period -> engine shutdown -> exit 0.

Health service names: "" and each served service's full name report readiness; "liveness" reports
that the process and its event loop are alive, so a loading or draining replica is not killed.
"""

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from servekit import tracing
from servekit.errors import ErrorInterceptor
from servekit.metrics import RequestMetricsInterceptor
from servekit.tls import server_credentials
from servekit.validation import Limits, max_message_bytes

logger = logging.getLogger(__name__)

LIVENESS = "liveness"

SERVER_OPTIONS = [
    # Keep idle client connections (the gateway's) alive through proxies and NAT; accept client
    # pings every 10 s even without calls in flight.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A second server on the same port would silently share traffic: refuse instead.
    ("grpc.so_reuseport", 0),
]


@dataclass
class ServiceSpec:
    """What a service plugs into the shared lifecycle."""

    names: Sequence[str]  # full gRPC service names, for health and reflection
    register: Callable[[grpc.aio.Server], None]  # adds the servicers
    start: Callable[[], Awaitable[None]]  # loads and warms up the engine
    stop: Callable[[], Awaitable[None]]  # releases the engine
    # raises while the engine cannot serve (e.g. vLLM's engine process died): readiness follows it
    check: Callable[[], Awaitable[None]] | None = None
    stage: str = ""  # planner, decoder or gateway: named in every error status's ErrorInfo
    # the service's other listeners (the gateway's HTTP front): out of rotation, then their in-flight
    # requests finish within the grace period, alongside the gRPC server's
    drain: Callable[[float], Awaitable[None]] | None = None


@dataclass
class ServerOptions:
    host: str
    port: int
    metrics_port: int  # 0 = no metrics endpoint
    shutdown_grace_seconds: float
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # with it, clients must show a certificate this CA bundle verifies
    health_check_seconds: float = 5.0  # how often ServiceSpec.check runs once loaded
    # Condition images come inline in requests: a message may hold every one at its largest.
    max_message_bytes: int = max_message_bytes(Limits())


class RunningServer:
    """A started server; `port` is the bound port (useful with port 0 in tests)."""

    def __init__(self, server: grpc.aio.Server, health: health_aio.HealthServicer, spec: ServiceSpec, port: int,
                 check_seconds: float):  # fmt: skip
        self.server = server
        self.health = health
        self.spec = spec
        self.port = port
        self.ready = asyncio.Event()
        self._stopped = False
        self._check_seconds = check_seconds
        self._monitor: asyncio.Task | None = None

    async def _set_ready(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.spec.names):
            await self.health.set(name, status)

    async def load(self) -> None:
        await self.spec.start()
        await self._set_ready(True)
        self.ready.set()
        logger.info("ready: %s on port %d", ", ".join(self.spec.names), self.port)
        if self.spec.check is not None:
            self._monitor = asyncio.create_task(self._watch_engine(self.spec.check))

    async def _watch_engine(self, check: Callable[[], Awaitable[None]]) -> None:
        """Out of rotation while the engine's own check fails; back when it passes again."""
        healthy = True
        while True:
            await asyncio.sleep(self._check_seconds)
            try:
                await check()
                ok = True
            except Exception as error:  # noqa: BLE001 - any failure means: do not route here
                ok = False
                if healthy:
                    logger.error("engine health check failed, NOT_SERVING: %s", error)
            if ok != healthy and not self._stopped:
                healthy = ok
                await self._set_ready(ok)
                if ok:
                    logger.info("engine healthy again, SERVING")

    async def stop(self, grace: float) -> None:
        """Leave rotation, let in-flight calls finish within `grace` seconds, release the engine."""
        if self._stopped:
            return
        self._stopped = True
        if self._monitor is not None:
            self._monitor.cancel()
        await self._set_ready(False)
        logger.info("draining for up to %.0f s", grace)
        await asyncio.gather(self.server.stop(grace), *([self.spec.drain(grace)] if self.spec.drain else []))
        await self.spec.stop()
        logger.info("stopped")


def _credentials(options: ServerOptions) -> grpc.ServerCredentials | None:
    if not options.tls_cert_file:
        return None
    return server_credentials(options.tls_cert_file, options.tls_key_file, options.tls_client_ca_file)


async def start_server(spec: ServiceSpec, options: ServerOptions) -> RunningServer:
    """Binds and starts the gRPC server, health NOT_SERVING until `load()`."""
    message_limits = [
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.max_send_message_length", options.max_message_bytes),
    ]
    # outermost first: the metrics see the status ErrorInterceptor gives each call
    interceptors = [*tracing.server_interceptors(), RequestMetricsInterceptor(spec.stage, spec.names),
                    ErrorInterceptor(spec.stage)]  # fmt: skip
    server = grpc.aio.server(interceptors=interceptors, options=[*SERVER_OPTIONS, *message_limits])
    spec.register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([*spec.names, reflection.SERVICE_NAME, "grpc.health.v1.Health"], server)
    address = f"{options.host}:{options.port}"
    credentials = _credentials(options)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind {address}")
    await server.start()
    running = RunningServer(server, health, spec, port, options.health_check_seconds)
    await running._set_ready(False)
    await health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    return running


def start_metrics(options: ServerOptions):
    """Prometheus /metrics on the gRPC host's address, not on every interface; returns prometheus'
    (server, thread), or None with no metrics port."""
    if options.metrics_port:
        return start_http_server(options.metrics_port, addr=options.host)
    return None


async def serve(spec: ServiceSpec, options: ServerOptions) -> None:
    """Runs a service until SIGTERM/SIGINT, then shuts it down gracefully."""
    start_metrics(options)
    running = await start_server(spec, options)
    logger.info("listening on %s:%d (loading)", options.host, running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    load = asyncio.create_task(running.load())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([load, stopped], return_when=asyncio.FIRST_COMPLETED)
    if load.done() and (error := load.exception()) is not None:
        await running.server.stop(0)
        raise error
    await stopped
    load.cancel()
    await running.stop(options.shutdown_grace_seconds)


def package_version() -> str:
    try:
        return version("glm-image-serve")
    except PackageNotFoundError:
        return "dev"
