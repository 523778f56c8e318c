"""Counting how streaming calls end, for a service's Prometheus metrics."""

from collections.abc import AsyncIterator

from prometheus_client import Counter

from servekit.errors import InvalidRequest


async def counted(stream: AsyncIterator, counter: Counter) -> AsyncIterator:
    """Re-yields `stream`, then counts its outcome: completed, invalid, failed or cancelled
    (the client went away or the deadline passed)."""
    outcome = "cancelled"
    try:
        async for item in stream:
            yield item
        outcome = "completed"
    except InvalidRequest:
        outcome = "invalid"
        raise
    except Exception:
        outcome = "failed"
        raise
    finally:
        counter.labels(outcome).inc()
