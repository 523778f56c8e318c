"""Admission control: a bounded number of requests in flight and a bounded queue behind them."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from prometheus_client import Gauge

from servekit.errors import Overloaded

IN_FLIGHT = Gauge("glmimage_requests_in_flight", "Requests being served", ["stage"])
QUEUED = Gauge("glmimage_requests_queued", "Requests waiting for admission", ["stage"])


class Admission:
    """`async with admission.slot() as waited:` runs the body once one of `max_in_flight` slots
    is free; at most `max_queued` requests wait, the next one gets RESOURCE_EXHAUSTED."""

    def __init__(self, stage: str, max_in_flight: int, max_queued: int):
        if max_in_flight < 1 or max_queued < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queued >= 0")
        self.stage = stage
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0
        self.queued = 0
        self._in_flight_gauge = IN_FLIGHT.labels(stage)
        self._queued_gauge = QUEUED.labels(stage)

    def _set(self, in_flight: int, queued: int) -> None:
        self.in_flight, self.queued = in_flight, queued
        self._in_flight_gauge.set(in_flight)
        self._queued_gauge.set(queued)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Yields the seconds spent waiting in the queue."""
        start = time.perf_counter()
        if self._slots.locked():
            if self.queued >= self.max_queued:
                raise Overloaded(
                    f"{self.stage} is at capacity: {self.in_flight} requests in flight (max "
                    f"{self.max_in_flight}) and {self.queued} queued (max {self.max_queued}); retry later"
                )
            self._set(self.in_flight, self.queued + 1)
            try:
                await self._slots.acquire()
            finally:
                self._set(self.in_flight, self.queued - 1)
        else:
            await self._slots.acquire()
        self._set(self.in_flight + 1, self.queued)
        try:
            yield time.perf_counter() - start
        finally:
            self._set(self.in_flight - 1, self.queued)
            self._slots.release()
