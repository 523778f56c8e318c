"""Admission control: a bounded number of requests in flight and a bounded queue behind them."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from prometheus_client import Counter, Gauge

from glmimage.v1 import common_pb2
from servekit.errors import Overloaded

IN_FLIGHT = Gauge("glmimage_requests_in_flight", "Requests being served", ["stage"])
QUEUED = Gauge("glmimage_requests_queued", "Requests waiting for admission", ["stage"])
BUSY_SECONDS = Counter("glmimage_busy_seconds", "Time with at least one request being served", ["stage"])


class Ticket:
    """A queue place; `await ticket.start()` trades it for a slot (held until the ticket ends)."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self.started = False

    async def start(self) -> float:
        """Waits for a slot in arrival order; returns the seconds waited."""
        begin = time.perf_counter()
        await self._admission._slots.acquire()
        self.started = True
        admission = self._admission
        admission._set(admission.in_flight + 1, admission.queued - 1)
        return time.perf_counter() - begin


class Admission:
    """`async with admission.slot() as waited:` runs the body once one of `max_in_flight` slots
    is free; at most `max_queued` requests wait, the next one gets RESOURCE_EXHAUSTED.

    `async with admission.ticket() as ticket:` takes a queue place at once and the slot only at
    `await ticket.start()`, for work that starts before it needs a slot (a decoder preparing while
    its plan streams); `max_queued` then bounds those places whether or not a slot is free."""

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
        self._busy = BUSY_SECONDS.labels(stage)
        self._busy_since = 0.0

    def _set(self, in_flight: int, queued: int) -> None:
        now = time.perf_counter()
        if self.in_flight == 0 and in_flight > 0:
            self._busy_since = now
        elif self.in_flight > 0 and in_flight == 0:
            self._busy.inc(now - self._busy_since)
        self.in_flight, self.queued = in_flight, queued
        self._in_flight_gauge.set(in_flight)
        self._queued_gauge.set(queued)

    def _refuse(self) -> Overloaded:
        return Overloaded(
            f"{self.stage} is at capacity: {self.in_flight} requests in flight (max "
            f"{self.max_in_flight}) and {self.queued} queued (max {self.max_queued}); retry later"
        )

    def load(self) -> common_pb2.Load:
        return common_pb2.Load(
            capacity=self.max_in_flight, active=self.in_flight, waiting=self.queued, max_waiting=self.max_queued
        )

    @contextlib.asynccontextmanager
    async def ticket(self) -> AsyncIterator[Ticket]:
        if self.queued >= self.max_queued:
            raise self._refuse()
        self._set(self.in_flight, self.queued + 1)
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            if ticket.started:
                self._set(self.in_flight - 1, self.queued)
                self._slots.release()
            else:
                self._set(self.in_flight, self.queued - 1)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Yields the seconds spent waiting in the queue."""
        start = time.perf_counter()
        if self._slots.locked():
            if self.queued >= self.max_queued:
                raise self._refuse()
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
