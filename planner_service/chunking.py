"""Groups streamed plan tokens into PlanTokens messages: small and frequent, never across grids."""

import time
from collections.abc import Callable
from dataclasses import dataclass

from glmimage.v1 import planner_pb2


@dataclass
class TokenChunker:
    """Feed token deltas; get (grid, offset, ids) runs. A run closes when it holds `chunk_tokens`
    ids, reaches the end of its grid, or its first id is `interval_s` old when more arrive."""

    preview_tokens: int
    chunk_tokens: int
    interval_s: float
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._produced = 0  # ids emitted so far, over both grids
        self._pending: list[int] = []
        self._pending_since = 0.0

    def _grid_of(self, index: int) -> tuple[planner_pb2.Grid, int]:
        if index < self.preview_tokens:
            return planner_pb2.GRID_PREVIEW, index
        return planner_pb2.GRID_TARGET, index - self.preview_tokens

    def _close(self) -> planner_pb2.PlanTokens:
        grid, offset = self._grid_of(self._produced)
        chunk = planner_pb2.PlanTokens(grid=grid, offset=offset, ids=self._pending)
        self._produced += len(self._pending)
        self._pending = []
        return chunk

    def feed(self, ids: list[int]) -> list[planner_pb2.PlanTokens]:
        out = []
        for token in ids:
            if not self._pending:
                self._pending_since = self.clock()
            self._pending.append(token)
            at_grid_end = self._produced + len(self._pending) == self.preview_tokens
            if len(self._pending) >= self.chunk_tokens or at_grid_end:
                out.append(self._close())
        if self._pending and self.clock() - self._pending_since >= self.interval_s:
            out.append(self._close())
        return out

    def flush(self) -> list[planner_pb2.PlanTokens]:
        return [self._close()] if self._pending else []

    @property
    def produced(self) -> int:
        return self._produced + len(self._pending)
