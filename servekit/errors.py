"""Domain errors and the one interceptor that turns them into gRPC status codes.

Service code raises these; it never calls context.abort itself. Anything else that escapes a
handler is a bug: INTERNAL with a generic message, and the trace in the log.

Every status also carries google.rpc details (grpc-status-details-bin, read with grpcio-status):
`ErrorInfo` (domain `glmimage.v1`, a stable `reason`, the `stage` that raised it), `BadRequest`
naming the field an `InvalidRequest` is about, `RetryInfo` where waiting helps.
"""

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

DOMAIN = "glmimage.v1"


class ServiceError(Exception):
    """An error a client can act on; `code` is the gRPC status it maps to, `reason` a stable name."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"
    retry_after_s: float | None = None  # a RetryInfo hint, where waiting helps

    def __init__(self, message: str = "", *, stage: str = ""):
        super().__init__(message)
        self.stage = stage  # the stage the error is about, when not the one raising it (gateway)

    def rpc_details(self, stage: str) -> list:
        """The google.rpc detail messages of this error's status; `stage` is the one raising it."""
        metadata = {"stage": self.stage or stage}
        details: list = [error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata)]
        if self.retry_after_s is not None:
            seconds = int(self.retry_after_s)
            delay = duration_pb2.Duration(seconds=seconds, nanos=int((self.retry_after_s - seconds) * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        return details


class InvalidRequest(ServiceError):
    """The request breaks a rule; the message states the rule, `field` names what breaks it."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"

    def __init__(self, message: str, field: str = "", *, stage: str = ""):
        super().__init__(message, stage=stage)
        self.field = field

    def rpc_details(self, stage: str) -> list:
        details = super().rpc_details(stage)
        if self.field:
            violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=str(self))
            details.append(error_details_pb2.BadRequest(field_violations=[violation]))
        return details


class IncompatiblePlan(ServiceError):
    """A plan written in another codebook than this decoder's (mixed-version rollout)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "INCOMPATIBLE_PLAN"


class Overloaded(ServiceError):
    """Admission refused: too many requests in flight and queued."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"
    retry_after_s = 1.0


class Busy(ServiceError):
    """Best-effort work (a preview) refused at once: the capacity is needed for full requests."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "BUSY"


class Preempted(ServiceError):
    """Best-effort work (a preview) stopped because a full request needed the capacity."""

    code = grpc.StatusCode.ABORTED
    reason = "PREEMPTED"


class NotReady(ServiceError):
    """The service is loading or draining."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "NOT_READY"
    retry_after_s = 5.0


class Unavailable(ServiceError):
    """A downstream stage cannot be reached (gateway)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "NO_REPLICA"
    retry_after_s = 5.0


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Stalled(ServiceError):
    """The other side stopped sending what the call waits for; the call is ended to free its place."""

    code = grpc.StatusCode.ABORTED
    reason = "STALLED"


class UpstreamError(ServiceError):
    """A status from another service, passed on unchanged (code, message and details)."""

    def __init__(self, code: grpc.StatusCode, message: str, details: list[any_pb2.Any] | None = None):
        super().__init__(message)
        self.code = code
        self.details = details or []

    def rpc_details(self, stage: str) -> list:
        return self.details


def status_details(error: grpc.RpcError) -> list[any_pb2.Any]:
    """The google.rpc details a failed call carried (packed), [] when none or inconsistent."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return []
    return list(status.details) if status is not None else []


def _pack(detail) -> any_pb2.Any:
    if isinstance(detail, any_pb2.Any):
        return detail
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def status_code(error: BaseException | None) -> grpc.StatusCode:
    """The status a call ends with when `error` (None: nothing) escapes its handler."""
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, ServiceError):
        return error.code
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the client left, or its deadline passed
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, method: str, stage: str) -> None:
    if not isinstance(error, ServiceError):
        logger.exception("unhandled error in %s", method, exc_info=error)
        error = ServiceError(f"internal error in {method}; see the server log")
    details = [_pack(detail) for detail in error.rpc_details(stage)]
    status = rpc_status.to_status(status_pb2.Status(code=error.code.value[0], message=str(error), details=details))
    await context.abort(status.code, status.details, status.trailing_metadata)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str, stage: str):
    async def wrapper(request_or_iterator, context):
        try:
            return await behavior(request_or_iterator, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status, never swallowed
            await _abort(context, error, method, stage)

    return wrapper


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str, stage: str):
    async def wrapper(request_or_iterator, context):
        try:
            async for response in behavior(request_or_iterator, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status, never swallowed
            await _abort(context, error, method, stage)

    return wrapper


def wrap_handler(
    handler: grpc.RpcMethodHandler, wrap_coroutine: Callable, wrap_generator: Callable
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped by `wrap_coroutine` or `wrap_generator` (behaviour -> behaviour),
    whichever fits: a streaming handler is an async generator, or a coroutine that writes with context.write()
    (grpc's own health Watch)."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_coroutine(handler.unary_unary), **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_coroutine(handler.stream_unary), **serializers)
    if handler.unary_stream:
        wrap = wrap_coroutine if inspect.iscoroutinefunction(handler.unary_stream) else wrap_generator
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **serializers)
    wrap = wrap_coroutine if inspect.iscoroutinefunction(handler.stream_stream) else wrap_generator
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **serializers)


def wrap_calls(handler: grpc.RpcMethodHandler, begin: Callable) -> grpc.RpcMethodHandler:
    """`handler` with `begin(context)` called as each call starts, and the function it returns called with what
    ended the call (the exception, None when it returned), whatever the handler's kind: for the interceptors
    that observe calls (metrics, traces)."""

    def coroutine(behavior):
        async def wrapper(request_or_iterator, context):
            end, error = begin(context), None
            try:
                return await behavior(request_or_iterator, context)
            except BaseException as caught:
                error = caught
                raise
            finally:
                end(error)

        return wrapper

    def generator(behavior):
        async def wrapper(request_or_iterator, context):
            end, error = begin(context), None
            try:
                async for response in behavior(request_or_iterator, context):
                    yield response
            except BaseException as caught:
                error = caught
                raise
            finally:
                end(error)

        return wrapper

    return wrap_handler(handler, coroutine, generator)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps ServiceError subclasses to their status codes and everything else to INTERNAL; `stage`
    (planner, decoder, gateway) goes into each status's ErrorInfo."""

    def __init__(self, stage: str = ""):
        self.stage = stage

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return wrap_handler(handler, lambda behavior: _wrap_unary(behavior, method, self.stage),
                            lambda behavior: _wrap_stream(behavior, method, self.stage))  # fmt: skip
