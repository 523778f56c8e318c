"""API keys and per-key limits at the gateway, for gRPC and the HTTP front alike.

The keys file (--api-keys-file) holds one key per line as `sha256:<hex digest of the key>`, then
optionally a name for logs and metrics; `#` starts a comment. The gateway never sees a key at rest,
only digests. The file is re-read when it changes (a Secret update swaps it), so a key is revoked
by deleting its line; a file that no longer parses keeps the keys last read, and says so in the log.
Clients send `authorization: Bearer KEY` (gRPC metadata) or `Authorization: Bearer KEY` (HTTP).
"""

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from gateway import metrics
from servekit.errors import ServiceError

logger = logging.getLogger(__name__)

_ENTRY = re.compile(r"sha256:([0-9a-f]{64})(?:\s+(\S.*))?")


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "INVALID_API_KEY"


class RateLimited(ServiceError):
    """A key over its requests per minute or requests in flight."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def parse_keys(text: str, source: str) -> dict[str, str]:
    """digest -> name; raises ValueError naming the line that breaks the format."""
    names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _ENTRY.fullmatch(line)
        if match is None:
            raise ValueError(
                f"{source}:{number}: expected 'sha256:<64 lowercase hex digits of the key> [name]' "
                "(make one with: printf %s KEY | sha256sum)"
            )
        digest, name = match.group(1), (match.group(2) or "").strip()
        if digest in names:
            raise ValueError(f"{source}:{number}: the same key is listed twice")
        names[digest] = name or f"sha256:{digest[:8]}"
    return names


class ApiKeys:
    """The keys file, read at start-up (errors stop the gateway) and again whenever it changes."""

    def __init__(self, path: str):
        self.path = path
        self._signature: tuple | None = None
        self._names: dict[str, str] = {}
        self._refresh(at_start=True)
        if not self._names:
            raise ValueError(f"--api-keys-file: {path} lists no key")

    def _refresh(self, at_start: bool = False) -> None:
        try:
            stat = os.stat(self.path)
            signature: tuple = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except OSError as error:
            signature = ("unreadable", str(error))
        if signature == self._signature:
            return
        self._signature = signature  # a bad version is reported once, not on every request
        try:
            with open(self.path, encoding="utf-8") as file:
                names = parse_keys(file.read(), self.path)
        except (OSError, ValueError) as error:
            if at_start:
                raise ValueError(f"--api-keys-file: {error}") from None
            logger.error("API keys file unusable, keeping the %d keys last read: %s", len(self._names), error)
            return
        self._names = names
        if not at_start:
            logger.info("API keys file re-read: %d keys", len(names))

    def name_of(self, authorization: str | None) -> str:
        """The name of the key in an `authorization` value ("Bearer KEY"); Unauthenticated otherwise."""
        self._refresh()
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("an API key is required: send 'authorization: Bearer KEY'")
        name = self._names.get(hashlib.sha256(key.encode()).hexdigest())
        if name is None:
            raise Unauthenticated("the API key is not valid (unknown or revoked)")
        return name


@dataclass
class _Usage:
    tokens: float  # requests the key may still start now (a bucket refilled at requests_per_minute)
    refilled_at: float
    in_flight: int = 0


class KeyLimits:
    """Requests per minute (a token bucket holding a minute's worth) and requests in flight, per key
    name; 0 turns a limit off."""

    def __init__(self, requests_per_minute: int, max_in_flight: int):
        self.requests_per_minute = requests_per_minute
        self.max_in_flight = max_in_flight
        self._usage: dict[str, _Usage] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """One request of the key's for as long as the block runs; RateLimited (before the block) when
        the key is over a limit."""
        now = time.monotonic()
        usage = self._usage.setdefault(key, _Usage(float(self.requests_per_minute), now))
        refusal = None
        if self.max_in_flight and usage.in_flight >= self.max_in_flight:
            refusal = RateLimited(f"this API key has {usage.in_flight} requests in flight, the most it may have", 1.0)
        elif self.requests_per_minute:
            rate = self.requests_per_minute / 60
            usage.tokens = min(self.requests_per_minute, usage.tokens + (now - usage.refilled_at) * rate)
            usage.refilled_at = now
            if usage.tokens < 1:
                refusal = RateLimited(
                    f"this API key may start {self.requests_per_minute} requests a minute", (1 - usage.tokens) / rate
                )
            else:
                usage.tokens -= 1
        metrics.KEY_REQUESTS.labels(key, "rate_limited" if refusal else "admitted").inc()
        if refusal:
            raise refusal
        usage.in_flight += 1
        metrics.KEY_IN_FLIGHT.labels(key).inc()
        try:
            yield
        finally:
            usage.in_flight -= 1
            metrics.KEY_IN_FLIGHT.labels(key).dec()


ANONYMOUS = "anonymous"  # the caller's name on a gateway without keys


class Gatekeeper:
    """Who may generate: without a keys file everyone (the gateway says so at start-up), with one the
    holders of its keys; each within the per-key limits."""

    def __init__(self, keys: ApiKeys | None, limits: KeyLimits):
        self.keys = keys
        self.limits = limits

    def authenticate(self, authorization: str | None) -> str:
        """The caller's key name (ANONYMOUS on an open gateway); Unauthenticated."""
        if self.keys is None:
            return ANONYMOUS
        try:
            return self.keys.name_of(authorization)
        except Unauthenticated:
            metrics.KEY_REQUESTS.labels("", "unauthenticated").inc()
            raise
