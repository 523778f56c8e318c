"""Client-side helpers for PlannerService streams."""

import time
from dataclasses import dataclass, field

from glmimage.v1 import planner_pb2


@dataclass
class ReceivedPlan:
    header: planner_pb2.PlanHeader | None = None
    preview: list[int] = field(default_factory=list)
    target: list[int] = field(default_factory=list)
    summary: planner_pb2.PlanSummary | None = None
    chunks: list[planner_pb2.PlanChunk] = field(default_factory=list)
    arrival: list[float] = field(default_factory=list)  # seconds since the call, per chunk

    @property
    def tokens(self) -> list[int]:
        return self.preview + self.target


def receive_plan(stream) -> ReceivedPlan:
    """Reads a Plan stream, checking the order (header, tokens, summary) and offset contiguity."""
    plan = ReceivedPlan()
    started = time.perf_counter()
    for chunk in stream:
        plan.chunks.append(chunk)
        plan.arrival.append(time.perf_counter() - started)
        kind = chunk.WhichOneof("chunk")
        if kind == "header":
            assert plan.header is None and not plan.chunks[:-1], "the header comes first, once"
            plan.header = chunk.header
        elif kind == "tokens":
            assert plan.header is not None and plan.summary is None
            grid = plan.preview if chunk.tokens.grid == planner_pb2.GRID_PREVIEW else plan.target
            if chunk.tokens.grid == planner_pb2.GRID_PREVIEW:
                assert not plan.target, "the preview grid comes before the target grid"
            assert chunk.tokens.offset == len(grid), "offsets are contiguous"
            grid.extend(chunk.tokens.ids)
        else:
            assert plan.summary is None
            plan.summary = chunk.summary
    return plan
