"""servekit's lifecycle on a real server: readiness follows the engine's own health check."""

import time

import pytest
from grpc_health.v1 import health_pb2
from servers import SERVING, ServerThread, health_status

from servekit.server import ServiceSpec

pytestmark = pytest.mark.service


async def nothing() -> None:
    return None


def wait_for(address: str, service: str, status: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while health_status(address, service) != status:
        assert time.monotonic() < deadline, f"health of {service!r} never became {status}"
        time.sleep(0.05)


def test_readiness_follows_the_engine_check_and_liveness_does_not():
    engine = {"healthy": True}

    async def check() -> None:
        if not engine["healthy"]:
            raise RuntimeError("engine process died")

    spec = lambda: ServiceSpec(names=["demo.v1.Demo"], register=lambda server: None, start=nothing,  # noqa: E731
                               stop=nothing, check=check)  # fmt: skip
    with ServerThread(spec, check_seconds=0.05) as server:
        assert health_status(server.address, "") == SERVING
        engine["healthy"] = False
        wait_for(server.address, "", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert health_status(server.address, "demo.v1.Demo") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(server.address, "liveness") == SERVING  # not restarted for it
        engine["healthy"] = True
        wait_for(server.address, "", SERVING)
