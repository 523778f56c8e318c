"""Real gRPC servers for service tests: the service's own lifecycle, in a background thread with
its own event loop, on a loopback port chosen by the OS."""

import asyncio
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servekit.server import RunningServer, ServerOptions, ServiceSpec, start_server


class ServerThread:
    """`with ServerThread(make_spec) as server:` starts, loads and warms up; `server.address`."""

    def __init__(self, make_spec: Callable[[], ServiceSpec], grace: float = 5.0, check_seconds: float = 5.0):
        self._make_spec = make_spec
        self._grace = grace
        self._check_seconds = check_seconds
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.running: RunningServer | None = None

    def call(self, coroutine, timeout: float = 300):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> "ServerThread":
        self._thread.start()

        async def boot():
            options = ServerOptions(host="127.0.0.1", port=0, metrics_port=0, shutdown_grace_seconds=self._grace,
                                    health_check_seconds=self._check_seconds)  # fmt: skip
            running = await start_server(self._make_spec(), options)
            await running.load()
            return running

        self.running = self.call(boot())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self, grace: float | None = None) -> None:
        if self.running is not None:
            self.call(self.running.stop(self._grace if grace is None else grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


SERVING = health_pb2.HealthCheckResponse.SERVING
