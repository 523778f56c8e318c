"""SIGTERM: a service leaves rotation, lets in-flight work finish, and exits 0."""

import os
import signal
import time

import grpc
import pytest

from glmimage.v1 import planner_pb2, planner_pb2_grpc
from servekit.healthcheck import check
from testkit.cluster import DEV_LIMITS, Service, free_port

pytestmark = pytest.mark.e2e


def test_planner_drains_in_flight_plans_then_exits_zero(model_dir, tmp_path):
    planner = Service("planner", ["planner_service", "--model", str(model_dir), "--engine", "transformers",
                                  *DEV_LIMITS, "--shutdown-grace-seconds", "60"],
                      free_port(), free_port(), tmp_path / "planner.log")  # fmt: skip
    planner.start(dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 300
        while not check(planner.address, timeout=1):
            assert planner.alive() and time.monotonic() < deadline, (tmp_path / "planner.log").read_text()
            time.sleep(0.5)
        with grpc.insecure_channel(planner.address) as channel:
            stub = planner_pb2_grpc.PlannerServiceStub(channel)
            call = stub.Plan(planner_pb2.PlanRequest(prompt="a sign", width=512, height=512, seed=1))
            first = next(call)  # the header: the plan is in flight
            planner.signal(signal.SIGTERM)
            rest = list(call)
        assert first.HasField("header") and rest[-1].HasField("summary")
        assert sum(len(c.tokens.ids) for c in rest if c.HasField("tokens")) == 256 + 256, "the plan finished"
        assert planner.process.wait(60) == 0
        assert "draining" in (tmp_path / "planner.log").read_text()
    finally:
        planner.stop()
