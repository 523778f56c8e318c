"""The gateway's chain against scripted stages: real gRPC servers on loopback in this process, whose
planners and decoders follow a script (fail before or while streaming, stall, refuse), so that every
failover path runs in well under a second each."""

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import pytest

from gateway.chain import Chain, ChainOptions, ResolvedRequest
from gateway.replicas import ReplicaPool
from glmimage.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, planner_pb2, planner_pb2_grpc
from servekit.errors import ServiceError, Unavailable, UpstreamError
from servekit.server import ServerOptions, ServiceSpec, start_server

pytestmark = pytest.mark.unit

ROWS = COLS = 2  # a 2x2 target grid, no preview: 4 plan tokens
STEPS = 3


@dataclass
class Script:
    """What the next calls do, in order, whichever replica they reach (replicas may share one):
    "ok", "unavailable-before", "unavailable-mid", "stall-mid", "close-mid" (end the stream early,
    with no status), "slow-end" (a planner: 0.3 s between its summary and its status), "invalid", "busy";
    the last repeats."""

    actions: list[str] = field(default_factory=lambda: ["ok"])
    calls: int = 0

    def next(self) -> str:
        action = self.actions[min(self.calls, len(self.actions) - 1)]
        self.calls += 1
        return action


async def act_before(action: str, context) -> None:
    if action == "unavailable-before":
        await context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
    if action == "invalid":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "width must be a multiple of 32")
    if action == "busy":
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "at capacity")


async def act_mid(action: str, context) -> None:
    if action == "unavailable-mid":
        await context.abort(grpc.StatusCode.UNAVAILABLE, "died")
    if action == "stall-mid":
        await asyncio.sleep(3600)


class ScriptedPlanner(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, script: Script):
        self.script = script
        self.ended = 0  # calls that ran to their end (not cancelled)

    async def Plan(self, request, context):
        action = self.script.next()
        await act_before(action, context)
        yield planner_pb2.PlanChunk(header=planner_pb2.PlanHeader(target_rows=ROWS, target_cols=COLS,
                                                                  codebook_size=16, plan_format="f"))  # fmt: skip
        yield planner_pb2.PlanChunk(tokens=planner_pb2.PlanTokens(grid=planner_pb2.GRID_TARGET, offset=0, ids=[1, 2]))
        await act_mid(action, context)
        if action == "close-mid":
            return
        yield planner_pb2.PlanChunk(tokens=planner_pb2.PlanTokens(grid=planner_pb2.GRID_TARGET, offset=2, ids=[3, 4]))
        yield planner_pb2.PlanChunk(summary=planner_pb2.PlanSummary())
        if action == "slow-end":
            await asyncio.sleep(0.3)
        self.ended += 1

    async def GetServerInfo(self, request, context):
        return common_pb2.ServerInfo(role=common_pb2.SERVICE_ROLE_PLANNER, plan_format="f",
                                     load=common_pb2.Load(capacity=4))  # fmt: skip


class ScriptedDecoder(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, script: Script):
        self.script = script
        self.plans: list[list[int]] = []  # the target ids of each complete plan received

    async def Decode(self, request_iterator, context):
        action = self.script.next()
        ids = []
        async for request in request_iterator:
            if request.HasField("plan_chunk") and request.plan_chunk.HasField("tokens"):
                ids += request.plan_chunk.tokens.ids
            if request.HasField("plan_chunk") and request.plan_chunk.HasField("summary"):
                break  # the plan is complete: a decoder starts now, as the real one does
        self.plans.append(ids)
        await act_before(action, context)
        for done in range(1, STEPS + 1):
            yield decoder_pb2.DecodeEvent(progress=common_pb2.Progress(stage=common_pb2.STAGE_DECODING, done=done,
                                                                       total=STEPS))  # fmt: skip
            if done == 2:
                await act_mid(action, context)
                if action == "close-mid":
                    return
        yield decoder_pb2.DecodeEvent(image_chunk=common_pb2.ImageChunk(data=bytes(ids)))
        yield decoder_pb2.DecodeEvent(completed=common_pb2.Completed(width=64, height=64))

    async def GetServerInfo(self, request, context):
        return common_pb2.ServerInfo(role=common_pb2.SERVICE_ROLE_DECODER, plan_format="f",
                                     load=common_pb2.Load(capacity=1))  # fmt: skip


async def serve(servicer, add) -> tuple:
    spec = ServiceSpec(names=["scripted"], register=lambda server: add(servicer, server),
                       start=lambda: asyncio.sleep(0), stop=lambda: asyncio.sleep(0))  # fmt: skip
    running = await start_server(spec, ServerOptions(host="127.0.0.1", port=0, metrics_port=0,
                                                     shutdown_grace_seconds=0))  # fmt: skip
    await running.load()
    return running, f"127.0.0.1:{running.port}"


def request() -> ResolvedRequest:
    return ResolvedRequest(request_id="r", prompt="p", width=64, height=64, seed=1, steps=STEPS, guidance_scale=1.5,
                           sampling=common_pb2.PlanSampling(), condition_images=[], output_format=1)  # fmt: skip


async def run_chain(planner_scripts, decoder_scripts, deadline_s=10.0, stall_s=0.5, cancel_after=None, bind_lead_s=0.0):
    """Runs one request; returns (events or the error, planners, decoders)."""
    servers, planners, decoders = [], [], []
    for script in planner_scripts:
        planner = ScriptedPlanner(script)
        servers.append((await serve(planner, planner_pb2_grpc.add_PlannerServiceServicer_to_server))[0])
        planners.append((planner, f"127.0.0.1:{servers[-1].port}"))
    for script in decoder_scripts:
        decoder = ScriptedDecoder(script)
        servers.append((await serve(decoder, decoder_pb2_grpc.add_DecoderServiceServicer_to_server))[0])
        decoders.append((decoder, f"127.0.0.1:{servers[-1].port}"))
    pools = [
        ReplicaPool("planner", [a for _, a in planners], planner_pb2_grpc.PlannerServiceStub, None, 0.1, 5.0),
        ReplicaPool("decoder", [a for _, a in decoders], decoder_pb2_grpc.DecoderServiceStub, None, 0.1, 5.0, 1),
    ]
    for pool in pools:
        pool.start()
        await pool.wait_serving()
    options = ChainOptions(planner_attempts=2, decoder_attempts=2, bind_lead_s=bind_lead_s, stall_s=stall_s)
    chain = Chain(request(), *pools, time.monotonic(), time.monotonic() + deadline_s, options)
    events: list = []

    async def consume():
        async for event in chain.run():
            events.append(event)

    task = asyncio.create_task(consume())
    try:
        if cancel_after is not None:
            await asyncio.sleep(cancel_after)
            task.cancel()
        await task
        outcome = events
    except (asyncio.CancelledError, Exception) as error:  # noqa: BLE001 - the outcome under test
        outcome = error
    finally:
        for pool in pools:
            await pool.close()
        for server in servers:
            await server.stop(0)
    return outcome, [p for p, _ in planners], [d for d, _ in decoders], chain


def completed(outcome) -> common_pb2.Completed:
    assert isinstance(outcome, list), outcome
    return outcome[-1].completed


def run(coroutine):
    return asyncio.run(coroutine)


def test_the_happy_path_streams_progress_and_the_image():
    outcome, _, (decoder,), _ = run(run_chain([Script()], [Script()]))
    kinds = [e.WhichOneof("event") for e in outcome]
    assert kinds == ["progress"] * 2 + ["progress"] * STEPS + ["image_chunk", "completed"]
    assert outcome[-2].image_chunk.data == bytes([1, 2, 3, 4]) and decoder.plans == [[1, 2, 3, 4]]
    assert (completed(outcome).planner_attempts, completed(outcome).decoder_attempts) == (1, 1)


@pytest.mark.parametrize("failure", ["unavailable-before", "unavailable-mid", "stall-mid", "close-mid"])
def test_a_failed_planner_is_replaced_and_the_decoder_gets_the_new_plan(failure):
    script = Script([failure, "ok"])
    outcome, _, (decoder,), _ = run(run_chain([script, script], [Script()]))
    assert completed(outcome).planner_attempts == 2 and script.calls == 2
    assert decoder.plans == [[1, 2, 3, 4]]  # one decode, of the complete plan from the second planner


@pytest.mark.parametrize("failure", ["unavailable-before", "unavailable-mid", "stall-mid", "close-mid"])
def test_a_failed_decoder_is_replaced_and_the_plan_replayed_not_regenerated(failure):
    script = Script([failure, "ok"])
    outcome, (planner,), decoders, _ = run(run_chain([Script()], [script, script]))
    assert completed(outcome).decoder_attempts == 2 and planner.script.calls == 1
    assert [plan for d in decoders for plan in d.plans] == [[1, 2, 3, 4], [1, 2, 3, 4]]
    progress = [e.progress.done for e in outcome if e.WhichOneof("event") == "progress" and e.progress.stage == 2]
    assert progress[-STEPS:] == [1, 2, 3]  # the replacement's steps, after what the failed one reported


def test_a_busy_stage_is_waited_for_without_using_an_attempt():
    outcome, (planner,), (decoder,), _ = run(
        run_chain([Script(["busy", "busy", "busy", "ok"])], [Script(["busy", "ok"])])
    )
    assert (completed(outcome).planner_attempts, completed(outcome).decoder_attempts) == (1, 1)
    assert planner.script.calls == 4 and decoder.script.calls == 2


def test_a_non_retryable_status_passes_through_with_the_stage_named():
    script = Script(["invalid", "ok"])
    outcome, *_ = run(run_chain([script, script], [Script()]))
    assert isinstance(outcome, UpstreamError) and outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(outcome) == "planner: width must be a multiple of 32" and script.calls == 1  # not retried


def test_attempts_exhausted_is_unavailable_naming_the_stage_and_the_last_error():
    script = Script(["unavailable-mid"])
    outcome, *_ = run(run_chain([Script()], [script, script]))
    assert isinstance(outcome, Unavailable)
    assert str(outcome).startswith("decoder: no replica could serve the request after 2 attempt(s)")
    assert "died" in str(outcome)


def test_the_deadline_ends_a_request_waiting_for_a_stalled_decoder():
    outcome, *_ = run(run_chain([Script()], [Script(["stall-mid"])], deadline_s=1.0, stall_s=30.0))
    assert isinstance(outcome, ServiceError) and outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_client_cancel_cancels_both_stage_calls():
    outcome, _, _, chain = run(run_chain([Script(["stall-mid"])], [Script()], stall_s=30.0, cancel_after=0.3))
    assert isinstance(outcome, asyncio.CancelledError)
    assert chain.decode_call is None and all(r.outstanding == 0 for r in chain.planners.replicas.values())


def test_a_planner_call_ends_as_a_success_though_the_image_is_done_before_its_status():
    # bound to the decoder at once: it has the whole plan, and makes the image, before the planner's status
    outcome, planners, *_ = run(run_chain([Script(["slow-end"])], [Script()], stall_s=5.0, bind_lead_s=float("inf")))
    assert completed(outcome).planner_attempts == 1 and completed(outcome).timings.planning_seconds > 0
    assert planners[0].ended == 1  # not cancelled after the image was made
