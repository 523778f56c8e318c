"""Planner pieces without a model: chunking of streamed tokens, the loading state."""

import pytest

from glmimage.v1 import planner_pb2
from planner_service.chunking import TokenChunker

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_chunks_never_cross_the_preview_target_boundary_and_respect_the_size():
    chunker = TokenChunker(preview_tokens=5, chunk_tokens=3, interval_s=10, clock=FakeClock())
    chunks = chunker.feed(list(range(12))) + chunker.flush()
    assert [(c.grid, c.offset, list(c.ids)) for c in chunks] == [
        (planner_pb2.GRID_PREVIEW, 0, [0, 1, 2]),
        (planner_pb2.GRID_PREVIEW, 3, [3, 4]),
        (planner_pb2.GRID_TARGET, 0, [5, 6, 7]),
        (planner_pb2.GRID_TARGET, 3, [8, 9, 10]),
        (planner_pb2.GRID_TARGET, 6, [11]),
    ]


def test_a_partial_chunk_is_sent_once_it_is_old_enough():
    clock = FakeClock()
    chunker = TokenChunker(preview_tokens=0, chunk_tokens=100, interval_s=0.05, clock=clock)
    assert chunker.feed([1]) == []
    clock.now = 0.06
    [chunk] = chunker.feed([2])
    assert list(chunk.ids) == [1, 2] and chunker.produced == 2


def test_a_loading_planner_answers_unavailable():
    import asyncio

    from planner_service.servicer import PlannerServicer
    from servekit.errors import NotReady

    servicer = PlannerServicer(engine=None, admission=None, limits=None, resize_rule=None, plan_format="", model="",
                               chunk_tokens=1, chunk_interval_s=0, version="")  # fmt: skip

    async def first_chunk():
        return await anext(servicer.Plan(planner_pb2.PlanRequest(prompt="p", width=512, height=512), None))

    with pytest.raises(NotReady, match="loading"):
        asyncio.run(first_chunk())
    with pytest.raises(NotReady, match="loading"):
        asyncio.run(servicer.GetServerInfo(None, None))
