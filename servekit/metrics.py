"""The request metrics every service exports alike, each counted in one place per front: the gRPC
interceptor below for every call of a service's own API (whatever ends it: validation, admission,
authentication, the work itself), and the gateway's HTTP front (gateway.http_api) for its Images API.

    glmimage_requests_total{stage, method, code}
    glmimage_request_duration_seconds{stage, method, code}   (histogram, DURATION_BUCKETS)

`stage`: planner, decoder or gateway. `method`: the gRPC method (Plan, Decode, RenderPreview, Generate,
GetServerInfo) or the HTTP path (/v1/images/generations, /v1/images/edits). `code`: how the request
ended as its client sees it, by gRPC status code name (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
CANCELLED, DEADLINE_EXCEEDED, ...). Health checks and reflection are not counted.
"""

import time
from collections.abc import Sequence

import grpc
from prometheus_client import Counter, Histogram

from servekit.errors import status_code, wrap_calls

LABELS = ["stage", "method", "code"]
# From a ServerInfo poll (milliseconds) to a large image through both stages (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

REQUESTS = Counter("glmimage_requests", "Requests by stage, method and gRPC status code", LABELS)
DURATION_SECONDS = Histogram(
    "glmimage_request_duration_seconds", "From a request's arrival to its status, by stage, method and code", LABELS,
    buckets=DURATION_BUCKETS,
)  # fmt: skip


def observe(stage: str, method: str, code: str, started: float) -> None:
    """One request of `stage` ended with `code`; `started` is its time.perf_counter() at arrival."""
    REQUESTS.labels(stage, method, code).inc()
    DURATION_SECONDS.labels(stage, method, code).observe(time.perf_counter() - started)


def final_status(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: the one it was aborted with (ErrorInterceptor turns every error into
    one), else what `error` means; a cancelled call whose deadline had passed is DEADLINE_EXCEEDED."""
    code = context.code() or status_code(error)
    remaining = context.time_remaining()
    if code == grpc.StatusCode.CANCELLED and remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return code


def _begin(stage: str, method: str, context: grpc.aio.ServicerContext):
    started = time.perf_counter()
    return lambda error: observe(stage, method, final_status(context, error).name, started)


class RequestMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call of the gRPC services named `services` (full names); outside
    ErrorInterceptor, so that it sees the status each call really ends with."""

    def __init__(self, stage: str, services: Sequence[str]):
        self.stage = stage
        self.services = frozenset(services)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None or service not in self.services:
            return handler
        return wrap_calls(handler, lambda context: _begin(self.stage, method, context))
