"""The decoder service: a real server on a loopback port with the real tiny model, against plain
diffusers `GlmImagePipeline(...)` calls on the same checkpoint."""

import hashlib
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from decoder_service.service import make_service
from decoder_service.settings import DecoderSettings
from glmimage.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, planner_pb2
from tests.images import CONDITION_CASES, gif, model_input, png, png_header
from tests.servers import SERVING, ServerThread, health_status

pytestmark = pytest.mark.service

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a shop sign that says 'OPEN' and “24h”"
CHUNK_BYTES = 64 * 1024
LONG = 500  # steps: seconds of denoising, for calls that are stopped early
STALL_SECONDS = 3.0


@pytest.fixture(scope="module")
def server(model_dir):
    settings = DecoderSettings(
        model=str(model_dir), port=0, metrics_port=0, min_side=256, max_side=512, default_steps=2,
        max_steps=LONG, max_concurrent_decodes=1, max_queued=1, chunk_bytes=CHUNK_BYTES,
        plan_stall_timeout_seconds=STALL_SECONDS,
    )  # fmt: skip
    with ServerThread(lambda: make_service(settings)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield decoder_pb2_grpc.DecoderServiceStub(channel)


@pytest.fixture(scope="module")
def info(stub):
    return stub.GetServerInfo(common_pb2.GetServerInfoRequest(), timeout=10)


# -- building requests as the gateway forwards them -------------------------------------------------


def spec(width=256, height=256, seed=7, steps=2, images=(), **fields) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(
        spec=decoder_pb2.DecodeSpec(
            prompt=fields.pop("prompt", PROMPT), width=width, height=height, seed=seed, num_inference_steps=steps,
            condition_images=[common_pb2.InputImage(data=data) for data in images], **fields,
        )
    )  # fmt: skip


def header(info, width=256, height=256, conditions=(), **fields) -> decoder_pb2.DecodeRequest:
    values = dict(
        request_id="plan-1", target_rows=height // 32, target_cols=width // 32, preview_rows=4, preview_cols=4,
        codebook_size=info.codebook_size, plan_format=info.plan_format, seed=7, width=width, height=height,
        condition_images=[planner_pb2.ConditionImagePlan(rows=r, cols=c, ids=ids) for r, c, ids in conditions],
    )  # fmt: skip
    values.update(fields)
    return decoder_pb2.DecodeRequest(plan_chunk=planner_pb2.PlanChunk(header=planner_pb2.PlanHeader(**values)))


def tokens(offset, ids, grid=planner_pb2.GRID_TARGET) -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(
        plan_chunk=planner_pb2.PlanChunk(tokens=planner_pb2.PlanTokens(grid=grid, offset=offset, ids=ids))
    )


def summary() -> decoder_pb2.DecodeRequest:
    return decoder_pb2.DecodeRequest(
        plan_chunk=planner_pb2.PlanChunk(
            summary=planner_pb2.PlanSummary(finish_reason=planner_pb2.FINISH_REASON_COMPLETE)
        )
    )


def plan_stream(info, ids, width=256, height=256, conditions=(), chunk=24) -> list:
    """What a planner streams: header, the 4x4 preview, the target grid in chunks, the summary."""
    items = [header(info, width, height, conditions), tokens(0, list(range(16)), planner_pb2.GRID_PREVIEW)]
    items += [tokens(start, ids[start : start + chunk]) for start in range(0, len(ids), chunk)]
    return [*items, summary()]


def random_ids(width, height, seed=0, codebook=64) -> list[int]:
    return np.random.RandomState(seed).randint(0, codebook, (height // 32) * (width // 32)).tolist()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Result:
    def __init__(self, events):
        self.events = events
        self.kinds = [event.WhichOneof("event") for event in events]
        self.progress = [event.progress for event in events if event.HasField("progress")]
        self.chunks = [event.image_chunk.data for event in events if event.HasField("image_chunk")]
        self.data = b"".join(self.chunks)
        self.completed = events[-1].completed

    def pixels(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.data)).convert("RGB"))


def decode(stub, requests, timeout=60) -> Result:
    return Result(list(stub.Decode(iter(requests), timeout=timeout)))


class OpenDecode:
    """A Decode call whose requests are sent one by one, its events read in a thread."""

    def __init__(self, stub, timeout=60):
        self._requests: queue.Queue = queue.Queue()
        self.call = stub.Decode(iter(self._requests.get, None), timeout=timeout)
        self.events: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as error:
            self.error = error
        self.events.put(None)

    def send(self, *requests):
        for request in requests:
            self._requests.put(request)

    def close_requests(self):
        self._requests.put(None)

    def next_event(self, timeout=30):
        return self.events.get(timeout=timeout)

    def finish(self, timeout=60) -> list:
        events = []
        while (event := self.events.get(timeout=timeout)) is not None:
            events.append(event)
        self._thread.join(5)
        return events


def pixels_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# -- server info ---------------------------------------------------------------------------------


def test_server_info(info, model_dir):
    from servekit.plan_format import plan_format

    assert info.role == common_pb2.SERVICE_ROLE_DECODER
    assert info.plan_format == plan_format(model_dir)
    assert info.codebook_size == 64
    assert info.engine == "diffusers"
    assert (info.limits.min_side, info.limits.max_side, info.limits.size_multiple) == (256, 512, 32)
    assert info.default_num_inference_steps == 2 and info.default_guidance_scale == pytest.approx(1.5)


# -- pixel parity with diffusers -----------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "steps"), [(256, 256, 2), (256, 256, 4), (512, 256, 3)])
def test_text_to_image_pixels_equal_diffusers(stub, info, pipe, width, height, steps):
    from testkit.reference import render

    ids = random_ids(width, height, seed=steps)
    result = decode(stub, [spec(width, height, seed=11, steps=steps), *plan_stream(info, ids, width, height)])
    expected = render(pipe, PROMPT, width, height, seed=11, steps=steps, target_ids=ids)
    assert result.pixels().shape == (height, width, 3)
    np.testing.assert_array_equal(result.pixels(), pixels_of(expected))


@pytest.mark.parametrize("case", CONDITION_CASES)
def test_image_to_image_pixels_equal_diffusers(stub, info, pipe, case):
    """A real i2i plan from diffusers' own AR stage; the monolithic pipeline is given the image sent
    where its own sizing works, else the image resized once to the size both stages use."""
    from testkit.reference import render, sampled_target_grid

    make, size = CONDITION_CASES[case]
    data = make()
    condition = model_input(data, size)
    prompt = "make the sign say 'CLOSED'"
    ids, condition_ids = sampled_target_grid(pipe, prompt, 256, 256, seed=5, images=[condition])
    rows, cols = size[1] // 32, size[0] // 32
    assert len(condition_ids[0]) == rows * cols
    requests = [
        spec(seed=5, steps=3, images=[data], prompt=prompt),
        *plan_stream(info, ids, conditions=[(rows, cols, condition_ids[0])]),
    ]
    result = decode(stub, requests)
    expected = render(
        pipe, prompt, 256, 256, seed=5, steps=3, target_ids=ids, images=[condition], condition_ids=condition_ids
    )
    np.testing.assert_array_equal(result.pixels(), pixels_of(expected))
    # the condition image really takes part: without it, the same plan and seed decode differently
    text_only = render(pipe, prompt, 256, 256, seed=5, steps=3, target_ids=ids)
    assert not np.array_equal(result.pixels(), pixels_of(text_only))


# -- the event stream ----------------------------------------------------------------------------


def step_count() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("glmimage_decoder_denoise_step_seconds_count", {"stage": "decoder"}) or 0.0


def test_progress_chunks_and_completed(stub, info):
    ids = random_ids(256, 256, seed=1)
    steps_before = step_count()
    result = decode(stub, [spec(steps=3, request_id="req-42"), *plan_stream(info, ids)])
    assert step_count() - steps_before == 3  # the step-time histogram saw every step
    # one progress per step, in order, all before the image; then the chunks; then completed
    assert [(p.stage, p.done, p.total) for p in result.progress] == [
        (common_pb2.STAGE_DECODING, i, 3) for i in (1, 2, 3)
    ]
    assert result.kinds == ["progress"] * 3 + ["image_chunk"] * len(result.chunks) + ["completed"]
    assert len(result.chunks) > 1 and all(0 < len(chunk) <= CHUNK_BYTES for chunk in result.chunks)
    done = result.completed
    assert done.sha256 == hashlib.sha256(result.data).hexdigest()
    assert done.size_bytes == len(result.data)
    assert (done.width, done.height, done.seed, done.format) == (256, 256, 7, common_pb2.IMAGE_FORMAT_PNG)
    assert done.plan_tokens == 64 and done.request_id == "req-42" and done.decoder_attempts == 1
    t = done.timings
    assert t.decoder_prepare_seconds > 0 and t.denoising_seconds > 0 and t.vae_decode_seconds > 0
    assert t.encode_seconds > 0 and t.total_seconds >= t.denoising_seconds + t.vae_decode_seconds


def test_default_steps_and_request_id_from_metadata(stub, info):
    request = spec()
    request.spec.ClearField("num_inference_steps")
    events = list(
        stub.Decode(iter([request, *plan_stream(info, random_ids(256, 256))]), metadata=[("x-request-id", "meta-1")])
    )
    result = Result(events)
    assert len(result.progress) == 2  # the server's default
    assert result.completed.request_id == "meta-1"


@pytest.mark.parametrize(
    ("output_format", "pil_format"), [(common_pb2.IMAGE_FORMAT_JPEG, "JPEG"), (common_pb2.IMAGE_FORMAT_WEBP, "WEBP")]
)
def test_jpeg_and_webp(stub, info, output_format, pil_format):
    result = decode(stub, [spec(output_format=output_format), *plan_stream(info, random_ids(256, 256))])
    assert result.completed.format == output_format
    assert result.completed.sha256 == hashlib.sha256(result.data).hexdigest()
    with Image.open(io.BytesIO(result.data)) as image:
        assert image.format == pil_format and image.size == (256, 256)


# -- previews ------------------------------------------------------------------------------------


def test_denoising_previews_come_between_steps_and_change_nothing(stub, info):
    ids = random_ids(256, 256, seed=3)
    plain = decode(stub, [spec(steps=4), *plan_stream(info, ids)])
    result = decode(stub, [spec(steps=4, previews=2), *plan_stream(info, ids)])
    assert result.data == plain.data and result.completed.sha256 == plain.completed.sha256
    assert result.kinds[:6] == ["progress", "preview", "progress", "progress", "preview", "progress"]
    assert result.kinds[6:] == ["image_chunk"] * len(result.chunks) + ["completed"]
    previews = [event.preview for event in result.events if event.HasField("preview")]
    for index, preview in enumerate(previews):
        assert (preview.index, preview.stage, preview.format) == (index, common_pb2.STAGE_DECODING,
                                                                  common_pb2.IMAGE_FORMAT_PNG)  # fmt: skip
        with Image.open(io.BytesIO(preview.data)) as image:
            assert image.format == "PNG" and image.size == (preview.width, preview.height) == (128, 128)
    assert previews[0].data != previews[1].data != result.data  # the estimate moves towards the image
    assert result.completed.previews == 2 and plain.completed.previews == 0
    assert result.completed.timings.previews_seconds > 0 == plain.completed.timings.previews_seconds


def preview_request(info, rows=8, cols=8, seed=11, **fields) -> decoder_pb2.PreviewRequest:
    values = dict(prompt=PROMPT, seed=seed, plan_format=info.plan_format, rows=rows, cols=cols,
                  ids=random_ids(cols * 32, rows * 32, seed=rows + cols))  # fmt: skip
    values.update(fields)
    return decoder_pb2.PreviewRequest(**values)


@pytest.mark.parametrize(("rows", "cols"), [(8, 8), (4, 16)])
def test_a_plan_preview_is_the_preview_grid_rendered_as_diffusers_renders_it(stub, info, pipe, rows, cols):
    """The preview grid decoded at its own size with the decoder's preview steps (8): the same pixels
    as the monolithic pipeline given that grid as its plan."""
    from testkit.reference import render

    request = preview_request(info, rows, cols)
    preview = stub.RenderPreview(request, timeout=60)
    assert (preview.stage, preview.width, preview.height) == (common_pb2.STAGE_PLANNING, cols * 32, rows * 32)
    expected = render(pipe, PROMPT, cols * 32, rows * 32, seed=11, steps=8, target_ids=list(request.ids))
    np.testing.assert_array_equal(pixels_of(Image.open(io.BytesIO(preview.data))), pixels_of(expected))


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"plan_format": "glm-image/vq99/other"}, grpc.StatusCode.FAILED_PRECONDITION, "plan_format"),
        ({"ids": [1, 2, 3]}, grpc.StatusCode.INVALID_ARGUMENT, "has 3 ids for 8x8 cells"),
        ({"rows": 0}, grpc.StatusCode.INVALID_ARGUMENT, "a preview grid has 1 to 1024 cells"),
        ({"ids": [64] * 64}, grpc.StatusCode.INVALID_ARGUMENT, "preview id 64 at index 0 is out of range"),
        ({"prompt": " "}, grpc.StatusCode.INVALID_ARGUMENT, "prompt must not be empty"),
        ({"output_quality": 50}, grpc.StatusCode.INVALID_ARGUMENT, "output_quality applies to JPEG and WebP only"),
    ],
)
def test_bad_preview_requests_are_refused(stub, info, fields, code, message):
    with pytest.raises(grpc.RpcError) as caught:
        stub.RenderPreview(preview_request(info, **fields), timeout=30)
    assert caught.value.code() == code and message in caught.value.details()


def test_a_plan_preview_is_refused_at_once_while_a_full_image_denoises(stub, info):
    call = OpenDecode(stub)
    call.send(spec(steps=LONG), *plan_stream(info, random_ids(256, 256)))
    assert call.next_event().progress.done == 1  # denoising
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.RenderPreview(preview_request(info), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "previews never wait" in caught.value.details()
    assert time.monotonic() - started < 1.0
    call.call.cancel()


def test_the_last_steps_estimate_is_the_image(model_dir):
    """x0 = x_t - sigma_t * v after the last step is exactly the latents the last step produces, so a
    preview taken there is the final image pooled: the estimate's formula is the scheduler's."""
    from decoder_service.diffusers_engine import DiffusersEngine
    from decoder_service.domain import DecodeJob

    engine = DiffusersEngine(model_dir)
    engine.load()
    job = DecodeJob(request_id="e", prompt=PROMPT, width=256, height=256, seed=3, steps=3, guidance_scale=1.5,
                    condition_images=(), previews=1)  # fmt: skip
    prepared = engine.prepare(job, [])
    for _ in range(engine.begin(prepared, random_ids(256, 256))):
        engine.step(prepared)
    latents, velocity = prepared.last_step
    sigma = float(prepared.scheduler.sigmas[prepared.scheduler.step_index - 1])
    torch.testing.assert_close(latents - sigma * velocity, prepared.latents, rtol=0, atol=1e-5)
    assert pixels_of(engine.preview(prepared, max_side=512)).shape == (128, 128, 3)  # pooled x2, then decoded
    assert pixels_of(engine.preview(prepared, max_side=64)).shape == (64, 64, 3)  # pooled x4


# -- bad specs and plans: clear errors, and the service stays healthy ----------------------------

CONDITION = png_bytes(Image.new("RGB", (320, 192), (200, 30, 30)))
IDS = list(range(64))


def _bad_cases(info):
    ok_plan = plan_stream(info, IDS)
    return {
        "empty stream": ([], "starts with a spec"),
        "missing spec": (ok_plan, "starts with a spec"),
        "second spec": ([spec(), spec(), *ok_plan], "one spec, first"),
        "chunk before header": ([spec(), tokens(0, IDS), header(info)], "starts with its header"),
        "empty plan chunk": ([spec(), decoder_pb2.DecodeRequest(plan_chunk=planner_pb2.PlanChunk())], "empty one"),
        "gap": ([spec(), header(info), tokens(0, IDS[:10]), tokens(12, IDS[12:])], "leave a gap"),
        "overlap": ([spec(), header(info), tokens(0, IDS[:10]), tokens(8, IDS[8:])], "leave an overlap"),
        "too few ids": ([spec(), header(info), tokens(0, IDS[:63]), summary()], "got 63 of 64 target ids"),
        "too many ids": ([spec(), header(info), tokens(0, [*IDS, 1])], "too many target ids"),
        "ids after the plan": (
            [spec(steps=LONG), header(info), tokens(0, IDS), tokens(64, [1])],
            "too many target ids",
        ),
        "id out of range": ([spec(), header(info), tokens(0, [*IDS[:5], 64, *IDS[6:]])], "target id 64 at offset 5"),
        "no header": ([spec()], "before the plan header arrived"),
        "header only": ([spec(), header(info)], "got 0 of 64 target ids"),
        "second header": ([spec(), header(info), header(info)], "second header"),
        "grid of another size": ([spec(), header(info, width=512), *ok_plan[1:]], "target grid is 8x16"),
        "no target grid named": ([spec(), header(info), tokens(0, IDS, grid=0)], "must name their grid"),
        "width too small": ([spec(width=128), *ok_plan], "width must be a multiple of 32 between 256 and 512"),
        "height not a multiple": ([spec(height=250), *ok_plan], "height must be a multiple of 32"),
        "too many steps": ([spec(steps=LONG + 1), *ok_plan], f"num_inference_steps must be between 1 and {LONG}"),
        "zero steps": ([spec(steps=0), *ok_plan], f"num_inference_steps must be between 1 and {LONG}"),
        "negative guidance": ([spec(guidance_scale=-1), *ok_plan], "guidance_scale"),
        "empty prompt": ([spec(prompt=" "), *ok_plan], "prompt must not be empty"),
        "prompt of control characters": ([spec(prompt="\x00"), *ok_plan], "prompt must not be empty: it needs"),
        "request id with a newline": ([spec(request_id="a\nb"), *ok_plan], "request_id may hold only printable ASCII"),
        "unknown output format": ([spec(output_format=9), *ok_plan], "output_format must be PNG, JPEG or WebP, got 9"),
        "undecodable image": (
            [spec(images=[b"\x89PNG not really"]), header(info, conditions=[(6, 10, [0] * 60)]), tokens(0, IDS)],
            r"condition_images\[0\] is not a decodable PNG, JPEG or WebP image",
        ),
        "GIF image": (
            [spec(images=[gif()]), header(info, conditions=[(2, 2, [0] * 4)]), tokens(0, IDS)],
            r"condition_images\[0\] is not a decodable PNG, JPEG or WebP image",
        ),
        "decompression bomb": (
            [spec(images=[png_header(9000, 8000)]), header(info, conditions=[(2, 2, [0] * 4)]), tokens(0, IDS)],
            r"condition_images\[0\] is 9000x8000 pixels; at most 67108864 pixels are allowed",
        ),
        "image too small": (
            [spec(images=[png(31, 64)]), header(info, conditions=[(2, 1, [0] * 2)]), tokens(0, IDS)],
            "each side must be at least 32 pixels and the aspect ratio below 4",
        ),
        "aspect ratio in whole cells": (
            [spec(images=[png(146, 37)]), header(info, conditions=[(1, 5, [0] * 5)]), tokens(0, IDS)],
            "in whole grid cells it becomes 160x32",
        ),
        "empty image": ([spec(images=[b""]), *ok_plan], r"condition_images\[0\] is empty"),
        "condition count": ([spec(images=[CONDITION]), *ok_plan], "made with 0 condition images but the spec has 1"),
        "condition grid": (
            [spec(images=[CONDITION]), header(info, conditions=[(8, 8, [0] * 64)]), tokens(0, IDS)],
            r"condition_images\[0\] grid is 8x8 .* needs 6x10",
        ),
        "condition ids short": (
            [spec(images=[CONDITION]), header(info, conditions=[(6, 10, [0] * 59)]), tokens(0, IDS)],
            "has 59 ids for a 6x10 grid",
        ),
    }


BAD_CASES = list(_bad_cases(common_pb2.ServerInfo(plan_format="x", codebook_size=64)))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_requests_are_invalid_argument(stub, info, server, case):
    requests, message = _bad_cases(info)[case]
    with pytest.raises(grpc.RpcError) as caught:
        decode(stub, requests, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert re.search(message, caught.value.details()), caught.value.details()
    assert health_status(server.address) == SERVING


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"plan_format": "glm-image/vq64/0000000000000000"}, "plan_format 'glm-image/vq64/0000000000000000' is not"),
        ({"codebook_size": 16384}, "codebook_size 16384 is not this decoder's 64"),
    ],
)
def test_plan_of_another_codebook_is_failed_precondition(stub, info, server, fields, message):
    with pytest.raises(grpc.RpcError) as caught:
        decode(stub, [spec(), header(info, **fields), tokens(0, IDS)])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert message in caught.value.details()
    assert health_status(server.address) == SERVING


def test_still_decodes_after_bad_requests(stub, info, server):
    result = decode(stub, [spec(), *plan_stream(info, IDS)])
    assert result.completed.plan_tokens == 64
    assert health_status(server.address) == SERVING


# -- admission, cancellation, deadlines ----------------------------------------------------------


def wait_for_admission(in_flight: int, queued: int, timeout: float = 10.0) -> None:
    from prometheus_client import REGISTRY

    def now():
        return tuple(
            REGISTRY.get_sample_value(f"glmimage_requests_{name}", {"stage": "decoder"})
            for name in ("in_flight", "queued")
        )

    deadline = time.monotonic() + timeout
    while now() != (in_flight, queued):
        assert time.monotonic() < deadline, f"admission is {now()}, expected {(in_flight, queued)}"
        time.sleep(0.02)


def test_beyond_the_waiting_places_is_resource_exhausted(stub, info):
    """One decode denoising (1 slot) and one waiting for its plan (1 place): the third is refused at once."""
    running, waiting = OpenDecode(stub), OpenDecode(stub)
    running.send(spec(steps=LONG), *plan_stream(info, IDS))  # a complete plan: takes the slot
    running.close_requests()
    wait_for_admission(in_flight=1, queued=0)
    waiting.send(spec(), header(info))  # prepares without a slot while its plan is incomplete
    wait_for_admission(in_flight=1, queued=1)
    with pytest.raises(grpc.RpcError) as caught:
        decode(stub, [spec(), *plan_stream(info, IDS)], timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity" in caught.value.details()
    running.call.cancel()
    waiting.send(*plan_stream(info, IDS)[1:])
    waiting.close_requests()
    events = waiting.finish()
    assert events[-1].HasField("completed")  # the waiting one ran once the slot was freed


def test_a_stream_that_sends_no_plan_is_ended_and_frees_its_place(stub, info, server):
    """A spec and then nothing: ABORTED after the stall timeout, not a place held forever."""
    silent = OpenDecode(stub)
    silent.send(spec())
    started = time.monotonic()
    silent.finish()
    assert silent.error is not None and silent.error.code() == grpc.StatusCode.ABORTED
    assert "no plan chunk arrived for" in silent.error.details()
    assert time.monotonic() - started < STALL_SECONDS + 3
    wait_for_admission(in_flight=0, queued=0)
    assert health_status(server.address) == SERVING


def test_cancel_mid_denoise_frees_the_slot_within_a_step(stub, info):
    call = OpenDecode(stub)
    call.send(spec(steps=LONG), *plan_stream(info, IDS))
    call.close_requests()
    first, second = call.next_event(), call.next_event()
    assert (first.progress.done, second.progress.done) == (1, 2)
    call.call.cancel()
    started = time.perf_counter()
    result = decode(stub, [spec(steps=2), *plan_stream(info, IDS)])
    elapsed = time.perf_counter() - started
    # hundreds of steps were left (seconds of work); the next call waited at most for the step in progress
    assert result.completed.timings.queue_seconds < 1.0, result.completed.timings
    assert elapsed < 5.0
    events = call.finish()
    assert call.error is not None and call.error.code() == grpc.StatusCode.CANCELLED
    assert len([e for e in events if e.HasField("progress")]) < LONG - 2


def test_deadline_stops_the_decode(stub, info, server):
    with pytest.raises(grpc.RpcError) as caught:
        decode(stub, [spec(steps=LONG), *plan_stream(info, IDS)], timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    result = decode(stub, [spec(steps=2), *plan_stream(info, IDS)])
    assert result.completed.timings.queue_seconds < 1.0
    assert health_status(server.address) == SERVING


# -- the process: flags, SIGTERM drain, exit 0 ---------------------------------------------------


def test_sigterm_drains_in_flight_decode_and_exits_0(model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DECODER_MIN_SIDE": "256", "DECODER_MAX_SIDE": "256"}
    process = subprocess.Popen(
        [sys.executable, "-m", "decoder_service", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--shutdown-grace-seconds", "30"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = None
        for line in process.stderr:
            if match := re.search(r"ready: .* on port (\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the server did not report ready"
        lines = threading.Thread(target=process.stderr.read, daemon=True)  # keep the pipe drained
        lines.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            info = stub.GetServerInfo(common_pb2.GetServerInfoRequest(), timeout=10)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            call = OpenDecode(stub)
            call.send(spec(steps=12), *plan_stream(info, IDS))
            call.close_requests()
            assert call.next_event().progress.done == 1
            process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            events = call.finish()
            assert call.error is None
            assert [e.progress.done for e in events if e.HasField("progress")][-1] == 12
            assert events[-1].HasField("completed")
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- a checkpoint mounted without the AR model ---------------------------------------------------


def test_checkpoint_without_the_ar_model_needs_its_plan_format_and_processor(model_dir, tmp_path):
    from decoder_service.diffusers_engine import DiffusersEngine
    from servekit.plan_format import plan_format

    for name in ("model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        (tmp_path / name).symlink_to(Path(model_dir) / name)
    with pytest.raises(RuntimeError, match="pass --plan-format"):
        DiffusersEngine(tmp_path).load()
    override = plan_format(model_dir)
    with pytest.raises(RuntimeError, match="processor is missing: mount the checkpoint's processor/ folder"):
        DiffusersEngine(tmp_path, plan_format_override=override).load()
    (tmp_path / "processor").symlink_to(Path(model_dir) / "processor")
    with pytest.raises(RuntimeError, match="codebook of 16384; this DiT's has 64"):
        DiffusersEngine(tmp_path, plan_format_override="glm-image/vq16384/0123456789abcdef").load()
    engine = DiffusersEngine(tmp_path, plan_format_override=override)
    engine.load()
    assert engine.info.plan_format == plan_format(model_dir) and engine.info.codebook_size == 64
