"""Domain errors and the one interceptor that turns them into gRPC status codes.

Service code raises these; it never calls context.abort itself. Anything else that escapes a
handler is a bug: INTERNAL with a generic message, and the trace in the log.
"""

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error a client can act on; `code` is the gRPC status it maps to."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(ServiceError):
    """The request breaks a rule; the message states the rule."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class IncompatiblePlan(ServiceError):
    """A plan written in another codebook than this decoder's (mixed-version rollout)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(ServiceError):
    """Admission refused: too many requests in flight and queued."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(ServiceError):
    """The service is loading or draining."""

    code = grpc.StatusCode.UNAVAILABLE


class Unavailable(ServiceError):
    """A downstream stage cannot be reached (gateway)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Stalled(ServiceError):
    """The other side stopped sending what the call waits for; the call is ended to free its place."""

    code = grpc.StatusCode.ABORTED


class UpstreamError(ServiceError):
    """A status from another service, passed on unchanged (code and message)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, method: str) -> None:
    if isinstance(error, ServiceError):
        await context.abort(error.code, str(error))
    logger.exception("unhandled error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str):
    async def wrapper(request_or_iterator, context):
        try:
            return await behavior(request_or_iterator, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status, never swallowed
            await _abort(context, error, method)

    return wrapper


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str):
    async def wrapper(request_or_iterator, context):
        try:
            async for response in behavior(request_or_iterator, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status, never swallowed
            await _abort(context, error, method)

    return wrapper


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps ServiceError subclasses to their status codes and everything else to INTERNAL."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary, method), **serializers)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary, method), **serializers)
        # A streaming handler is an async generator, or a coroutine that writes with context.write()
        # (grpc's own health Watch): wrap each as what it is.
        if handler.unary_stream:
            wrap = _wrap_unary if inspect.iscoroutinefunction(handler.unary_stream) else _wrap_stream
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, method), **serializers)
        wrap = _wrap_unary if inspect.iscoroutinefunction(handler.stream_stream) else _wrap_stream
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, method), **serializers)
