"""PlannerService over a real loopback gRPC server, with the transformers engine and the tiny model."""

import io
import threading
import time

import grpc
import pytest
from images import CONDITION_CASES, gif, model_input, png, png_header, png_of_size
from PIL import Image
from plans import receive_plan
from servers import SERVING, ServerThread, health_status

from glmimage.v1 import common_pb2, planner_pb2, planner_pb2_grpc
from planner_service.service import make_engine, planner_spec
from planner_service.settings import PlannerSettings
from testkit import reference

pytestmark = pytest.mark.service

PROMPT = "a poster that says 'HELLO'"
SIZES = [(256, 256), (512, 256), (256, 512)]  # (width, height)


def planner_settings(model_dir, **overrides) -> PlannerSettings:
    values = dict(model=str(model_dir), engine="transformers", min_side=256, max_side=512, metrics_port=0,
                  max_queued=1, chunk_tokens=16)  # fmt: skip
    values.update(overrides)
    return PlannerSettings(**values)


@pytest.fixture(scope="module")
def planner(model_dir):
    settings = planner_settings(model_dir)
    engine = make_engine(settings, [])
    with ServerThread(lambda: planner_spec(settings, engine)) as server:
        yield server


@pytest.fixture(scope="module")
def stub(planner):
    with grpc.insecure_channel(planner.address) as channel:
        yield planner_pb2_grpc.PlannerServiceStub(channel)


def plan_request(width=256, height=256, seed=7, temperature=None, images=(), prompt=PROMPT, sampling=None, **fields):
    if temperature is not None:
        sampling = common_pb2.PlanSampling(temperature=temperature)
    return planner_pb2.PlanRequest(
        prompt=prompt, width=width, height=height, seed=seed, sampling=sampling,
        condition_images=[common_pb2.InputImage(data=d) for d in images], **fields,
    )  # fmt: skip


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_sampled_plan_equals_diffusers_ar_stage(stub, pipe, width, height):
    plan = receive_plan(stub.Plan(plan_request(width, height, seed=11)))
    expected_target, _ = reference.sampled_target_grid(pipe, PROMPT, width, height, seed=11)
    assert plan.target == expected_target
    h = plan.header
    assert (h.target_rows, h.target_cols) == (height // 32, width // 32)
    assert h.preview_rows * h.preview_cols == len(plan.preview) > 0
    assert h.seed == 11 and h.codebook_size == 64 and h.plan_format.startswith("glm-image/vq64/")
    assert plan.summary.finish_reason == planner_pb2.FINISH_REASON_COMPLETE
    assert plan.summary.target_tokens == len(plan.target) == width * height // 1024


def test_large_plans_at_the_default_limits(model_dir, pipe):
    """1K-4K-token plans: every size complete, in order, and the largest equal to diffusers' AR stage."""
    settings = planner_settings(model_dir, min_side=512, max_side=2048)
    engine = make_engine(settings, [])
    with (
        ServerThread(lambda: planner_spec(settings, engine)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = planner_pb2_grpc.PlannerServiceStub(channel)
        for width, height in [(1024, 1024), (2048, 512), (512, 2048), (2048, 2048)]:
            plan = receive_plan(stub.Plan(plan_request(width, height, seed=11), timeout=300))
            assert plan.summary.finish_reason == planner_pb2.FINISH_REASON_COMPLETE
            assert len(plan.target) == width * height // 1024
            assert len(plan.preview) == plan.header.preview_rows * plan.header.preview_cols > 0
    assert len(plan.tokens) == 4352
    assert plan.target == reference.sampled_target_grid(pipe, PROMPT, 2048, 2048, seed=11)[0]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_greedy_plan_equals_transformers_generate(stub, pipe, width, height):
    plan = receive_plan(stub.Plan(plan_request(width, height, temperature=0.0)))
    expected = reference.greedy_plan(pipe, PROMPT, width, height)
    assert plan.tokens == expected[: len(plan.tokens)]
    assert len(plan.tokens) == len(expected) - 1  # every grid token; not the end slot


@pytest.mark.parametrize("case", CONDITION_CASES)
def test_image_to_image_plan_equals_diffusers(stub, pipe, case):
    """The monolithic AR stage given the same image: the one sent where its own sizing works, else
    the image resized once to the size both stages use."""
    make, size = CONDITION_CASES[case]
    data = make()
    image = model_input(data, size)
    plan = receive_plan(stub.Plan(plan_request(images=[data], seed=5)))
    expected_target, expected_conditions = reference.sampled_target_grid(pipe, PROMPT, 256, 256, 5, images=[image])
    assert plan.preview == [] and (plan.header.preview_rows, plan.header.preview_cols) == (0, 0)
    assert plan.target == expected_target
    [condition] = plan.header.condition_images
    assert (condition.rows, condition.cols) == (size[1] // 32, size[0] // 32)  # the decoder's grid for this image
    assert list(condition.ids) == expected_conditions[0]


def test_image_to_image_greedy_plan_equals_transformers_generate(stub, pipe):
    data = png(300, 200)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    greedy = receive_plan(stub.Plan(plan_request(images=[data], temperature=0.0)))
    assert greedy.target == reference.greedy_plan(pipe, PROMPT, 256, 256, images=[image])[:-1]


def test_four_condition_images_at_the_byte_limit_pass_the_transport(stub):
    images = [png_of_size(8 * 1024 * 1024, seed=seed) for seed in range(4)]
    request = plan_request(images=images)
    assert request.ByteSize() > 32 * 1024 * 1024
    plan = receive_plan(stub.Plan(request))
    assert [(c.rows, c.cols) for c in plan.header.condition_images] == [(2, 2)] * 4
    assert plan.summary.finish_reason == planner_pb2.FINISH_REASON_COMPLETE


def test_same_seed_same_plan_and_chunks_stream_before_the_end(stub):
    first = receive_plan(stub.Plan(plan_request(512, 256, seed=3)))
    second = receive_plan(stub.Plan(plan_request(512, 256, seed=3)))
    assert first.tokens == second.tokens
    token_chunks = [c for c in first.chunks if c.HasField("tokens")]
    assert len(token_chunks) >= 10 and all(len(c.tokens.ids) <= 16 for c in token_chunks)
    # streaming is real: the first tokens arrive long before the last ones
    first_token_at = first.arrival[1]
    assert first_token_at < 0.5 * first.arrival[-1]


def test_unset_seed_is_chosen_and_reported(stub):
    plan = receive_plan(stub.Plan(planner_pb2.PlanRequest(prompt=PROMPT, width=256, height=256)))
    again = receive_plan(stub.Plan(plan_request(seed=plan.header.seed)))
    assert plan.tokens == again.tokens


BAD_REQUESTS = [
    ("size not a multiple of 32", dict(width=250), "width must be a multiple of 32 between 256 and 512"),
    ("size below range", dict(height=224), "height must be a multiple of 32 between 256 and 512"),
    ("size above range", dict(width=1024), "width must be a multiple of 32"),
    ("empty prompt", dict(prompt="   "), "prompt must not be empty"),
    ("prompt of control characters", dict(prompt="\x00"), "prompt must not be empty: it needs at least one visible"),
    ("prompt too long", dict(prompt="x" * 5000), "prompt must be at most 4000 characters"),
    ("negative temperature", dict(temperature=-1.0), "sampling.temperature must be a finite number >= 0"),
    ("NaN temperature", dict(temperature=float("nan")), "sampling.temperature"),
    ("top_p zero", dict(sampling=common_pb2.PlanSampling(top_p=0.0)), "sampling.top_p must be in (0, 1]"),
    ("top_p above one", dict(sampling=common_pb2.PlanSampling(top_p=1.5)), "sampling.top_p must be in (0, 1]"),
    ("top_k above codebook", dict(sampling=common_pb2.PlanSampling(top_k=65)), "codebook size 64"),
    ("too many images", dict(images=[png(64, 64)] * 5), "at most 4 condition images"),
    ("undecodable image", dict(images=[b"not an image"]), "condition_images[0] is not a decodable PNG, JPEG or WebP"),
    ("empty image", dict(images=[b""]), "condition_images[0] is empty"),
    ("oversized image", dict(images=[b"\x89PNG" + b"0" * (8 * 1024 * 1024)]), "at most 8388608 bytes"),
    ("extreme aspect ratio", dict(images=[png(400, 64)]), "is 400x64 pixels; each side must be at least 32 pixels and"),
    ("aspect ratio in whole cells", dict(images=[png(146, 37)]), "in whole grid cells it becomes 160x32"),
    ("image too small", dict(images=[png(31, 64)]), "each side must be at least 32 pixels"),
    ("GIF image", dict(images=[gif()]), "condition_images[0] is not a decodable PNG, JPEG or WebP"),
    ("decompression bomb", dict(images=[png_header(9000, 8000)]), "at most 67108864 pixels are allowed"),
    ("second image bad", dict(images=[png(64, 64), b"junk"]), "condition_images[1] is not a decodable"),
    ("long request id", dict(request_id="r" * 200), "request_id must be at most 128 characters"),
    ("request id with a newline", dict(request_id="a\nb"), "request_id may hold only printable ASCII characters"),
    ("non-ASCII request id", dict(request_id="r\u00e9q"), "request_id may hold only printable ASCII characters"),
]


@pytest.mark.parametrize(("case", "fields", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_invalid_argument(stub, planner, case, fields, message):
    chunks = []
    with pytest.raises(grpc.RpcError) as error:
        for chunk in stub.Plan(plan_request(**fields)):
            chunks.append(chunk)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert message in error.value.details()
    assert chunks == []  # refused before the model's work: the header follows it
    assert health_status(planner.address) == SERVING


def test_cancellation_frees_the_engine(stub):
    call = stub.Plan(plan_request(512, 512, seed=1))
    next(call), next(call)  # header + first tokens: generation is running
    call.cancel()
    started = time.perf_counter()
    plan = receive_plan(stub.Plan(plan_request(256, 256, temperature=0.0)))
    assert plan.summary is not None
    # the next plan did not wait for the cancelled one's remaining ~500 tokens
    assert plan.arrival[1] < 0.5 * (time.perf_counter() - started) + 1.0


def test_deadline_stops_generation(stub):
    with pytest.raises(grpc.RpcError) as error:
        receive_plan(stub.Plan(plan_request(512, 512), timeout=0.5))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    plan = receive_plan(stub.Plan(plan_request(256, 256, temperature=0.0), timeout=60))
    assert plan.summary is not None


def test_queue_limit_rejects_with_resource_exhausted(stub):
    running = stub.Plan(plan_request(512, 512, seed=2))
    next(running)  # in flight
    queued_result = {}

    def queued():
        try:
            queued_result["plan"] = receive_plan(stub.Plan(plan_request(256, 256, seed=2)))
        except grpc.RpcError as error:
            queued_result["error"] = error

    waiter = threading.Thread(target=queued)
    waiter.start()
    time.sleep(0.5)  # the second request is now waiting for the slot
    with pytest.raises(grpc.RpcError) as error:
        receive_plan(stub.Plan(plan_request(256, 256)))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry later" in error.value.details()
    running.cancel()
    waiter.join(60)
    assert "plan" in queued_result, queued_result


def test_server_info_and_health(stub, planner):
    info = stub.GetServerInfo(common_pb2.GetServerInfoRequest())
    assert info.role == common_pb2.SERVICE_ROLE_PLANNER
    assert info.engine == "transformers" and info.codebook_size == 64
    assert info.plan_format.startswith("glm-image/vq64/")
    assert (info.limits.min_side, info.limits.max_side, info.limits.size_multiple) == (256, 512, 32)
    for service in ("", "glmimage.v1.PlannerService", "liveness"):
        assert health_status(planner.address, service) == SERVING
