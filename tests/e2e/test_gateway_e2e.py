"""The three services as real processes on loopback, driven through the gateway's public API."""

import io
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from images import CONDITION_CASES, model_input, png, png_of_size
from PIL import Image
from servers import SERVING, health_status
from stages import pixels, restart

from gateway.client import ImageClient, error_details
from glmimage.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, planner_pb2, planner_pb2_grpc
from testkit import reference
from testkit.cluster import Cluster

pytestmark = pytest.mark.e2e

PROMPT = "a poster that says 'HELLO'"


@pytest.fixture(scope="module")
def cluster(model_dir):
    # two replicas of each stage, so that failover has somewhere to go; quick plan previews (2 steps)
    with Cluster(str(model_dir), engine="transformers", planners=2, decoders=2,
                 gateway_args=["--health-interval-seconds", "0.5"],
                 stage_args={"decoder": ["--preview-steps", "2"]}) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def client(cluster):
    with ImageClient(cluster.gateway.address) as c:
        yield c


def stages(cluster, kind: str):
    return [s for s in cluster.services if s.name.startswith(kind)]


def in_flight(cluster, kind: str) -> float:
    return sum(s.metric("glmimage_requests_in_flight", stage=kind) for s in stages(cluster, kind) if s.alive())


def wait_idle(cluster, timeout: float = 10.0) -> float:
    """Seconds until no planner or decoder has a request in flight."""
    started = time.perf_counter()
    while in_flight(cluster, "planner") or in_flight(cluster, "decoder"):
        assert time.perf_counter() - started < timeout, "a stage kept working on a stopped request"
        time.sleep(0.1)
    return time.perf_counter() - started


def completed_plans(cluster) -> float:
    return sum(s.metric("glmimage_requests_total", stage="planner", method="Plan", code="OK")
               for s in stages(cluster, "planner"))  # fmt: skip


def test_greedy_image_equals_the_monolithic_pipeline(client, pipe):
    result = client.generate(PROMPT, 256, 256, seed=7, num_inference_steps=3, temperature=0.0)
    greedy = reference.greedy_plan(pipe, PROMPT, 256, 256)
    preview_tokens = 256
    target = greedy[preview_tokens : preview_tokens + 64]
    expected = reference.render(pipe, PROMPT, 256, 256, seed=7, steps=3, target_ids=target)
    assert np.array_equal(pixels(result.image), np.asarray(expected))
    assert result.accepted.seed == result.completed.seed == 7
    assert result.completed.plan_tokens == 64 and result.completed.format == common_pb2.IMAGE_FORMAT_PNG


@pytest.mark.parametrize(("width", "height"), [(256, 256), (512, 256), (1024, 1024)])
def test_sampled_image_equals_the_monolithic_pipeline(client, pipe, width, height):
    result = client.generate(PROMPT, width, height, seed=11, num_inference_steps=2)
    expected = reference.render(pipe, PROMPT, width, height, seed=11, steps=2)  # AR + DiT in one call
    assert np.array_equal(pixels(result.image), np.asarray(expected))


def test_image_to_image_equals_the_monolithic_pipeline(client, pipe):
    source = Image.fromarray((np.random.RandomState(3).rand(200, 300, 3) * 255).astype("uint8"))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    result = client.generate(PROMPT, 256, 256, seed=5, num_inference_steps=2, condition_images=[buffer.getvalue()])
    expected = reference.render(pipe, PROMPT, 256, 256, seed=5, steps=2, images=[source])
    assert np.array_equal(pixels(result.image), np.asarray(expected))


def test_progress_is_reported_for_both_stages(client):
    events = []
    result = client.generate(PROMPT, 256, 256, seed=1, num_inference_steps=4, on_progress=lambda *e: events.append(e))
    planning = [e for e in events if e[0] == common_pb2.STAGE_PLANNING]
    decoding = [e for e in events if e[0] == common_pb2.STAGE_DECODING]
    assert planning[-1][1:] == (320, 320) and [d for _, d, _ in planning] == sorted(d for _, d, _ in planning)
    assert [(d, t) for _, d, t in decoding] == [(i, 4) for i in range(1, 5)]
    assert result.accepted.num_inference_steps == 4


def test_previews_come_while_the_image_is_made_and_leave_it_unchanged(client, pipe):
    """previews=2 at 512x512: the plan preview (the 16x16 preview grid rendered) comes before the
    planner's last token, a denoising estimate before the image; the image is the monolithic one."""
    events = []
    result = client.generate(
        PROMPT, 512, 512, seed=3, num_inference_steps=4, temperature=0.0, previews=2,
        on_progress=lambda stage, done, total: events.append(("progress", stage, done, total)),
        on_preview=lambda preview: events.append(("preview", preview.stage, preview.index)),
    )  # fmt: skip
    last_plan_token = events.index(("progress", common_pb2.STAGE_PLANNING, 512, 512))
    first_denoising_step = events.index(("progress", common_pb2.STAGE_DECODING, 1, 4))
    plan_preview = events.index(("preview", common_pb2.STAGE_PLANNING, 0))
    denoising_preview = events.index(("preview", common_pb2.STAGE_DECODING, 1))
    assert plan_preview < last_plan_token and first_denoising_step < denoising_preview
    assert [e for e in events if e[0] == "preview"] == [events[plan_preview], events[denoising_preview]]
    sizes = [(p.width, p.height) for p in result.previews]
    assert sizes == [(512, 512), (256, 256)] == [Image.open(io.BytesIO(p.data)).size for p in result.previews]
    assert result.completed.previews == 2 and len({p.data for p in result.previews} | {result.image}) == 3

    greedy = reference.greedy_plan(pipe, PROMPT, 512, 512)
    expected = reference.render(pipe, PROMPT, 512, 512, seed=3, steps=4, target_ids=greedy[256:512])
    assert np.array_equal(pixels(result.image), np.asarray(expected))


def test_no_previews_unless_asked_and_image_to_image_previews_come_from_denoising(client):
    plain = client.generate(PROMPT, 256, 256, seed=4, num_inference_steps=3)
    assert plain.previews == [] and plain.completed.previews == 0
    edited = client.generate(PROMPT, 256, 256, seed=4, num_inference_steps=3, condition_images=[png(300, 200)], previews=2,
                             output_format="jpeg", output_quality=80)  # fmt: skip
    assert [(p.index, p.stage, p.format) for p in edited.previews] == [
        (i, common_pb2.STAGE_DECODING, common_pb2.IMAGE_FORMAT_JPEG) for i in (0, 1)
    ]
    assert edited.completed.previews == 2


def test_the_cli_writes_previews_next_to_the_image_as_they_arrive(cluster, tmp_path):
    out = tmp_path / "poster.png"
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--address", cluster.gateway.address, "generate", PROMPT,
         "--size", "512x512", "--seed", "5", "--steps", "3", "--previews", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "previews: 2 of 2" in done.stdout
    for index, (kind, side) in enumerate((("plan preview", 512), ("denoising preview", 256))):
        path = tmp_path / f"poster.preview-{index}.png"
        assert f"{path}: {kind}, {side}x{side}, at " in done.stderr
        assert Image.open(path).size == (side, side)
    assert Image.open(out).size == (512, 512)


def open_decode(address: str, plan: list, steps: int):
    """A Decode call straight to one decoder pod with a complete plan: it holds the pod for `steps` steps."""
    channel = grpc.insecure_channel(address)
    side = plan[0].header.width
    spec = decoder_pb2.DecodeSpec(prompt=PROMPT, width=side, height=side, seed=1, num_inference_steps=steps)
    requests = [decoder_pb2.DecodeRequest(spec=spec), *(decoder_pb2.DecodeRequest(plan_chunk=c) for c in plan)]
    return decoder_pb2_grpc.DecoderServiceStub(channel).Decode(iter(requests), timeout=120), channel


def test_previews_are_skipped_not_queued_when_every_decoder_is_busy(client, cluster):
    """Both decoders denoise (calls straight to the pods), and the request's decoder has a complete
    plan waiting behind it: its plan preview is refused at once, its denoising previews are skipped,
    it finishes as it would without previews, and Completed says none came."""
    planner = stages(cluster, "planner")[0]
    plan = list(planner_pb2_grpc.PlannerServiceStub(grpc.insecure_channel(planner.address)).Plan(
        planner_pb2.PlanRequest(prompt=PROMPT, width=1024, height=1024, seed=1), timeout=120))  # fmt: skip
    decoders = [s.address for s in stages(cluster, "decoder") if s.alive()]
    holds = [open_decode(address, plan, steps=100) for address in decoders]
    for call, _ in holds:
        assert next(call).progress.done == 1  # denoising
    skipped_before = cluster.gateway.metric("glmimage_gateway_previews_total", outcome="skipped")
    planned = threading.Event()
    outcome = {}

    def generate():
        outcome["result"] = client.generate(
            PROMPT, 256, 256, seed=9, num_inference_steps=4, previews=2, timeout=120,
            on_progress=lambda stage, done, total: stage == common_pb2.STAGE_PLANNING and done == total and planned.set(),
        )  # fmt: skip

    worker = threading.Thread(target=generate)
    worker.start()
    assert planned.wait(60)
    time.sleep(2.0)  # its decoder has the plan and waits for the slot
    waiting = [open_decode(address, plan, steps=100) for address in decoders]  # complete plans, behind it
    time.sleep(1.0)
    for call, _ in holds:
        call.cancel()
    worker.join(60)
    for call, channel in [*waiting, *holds]:
        call.cancel()
        channel.close()
    result = outcome["result"]
    assert result.previews == [] and result.completed.previews == 0
    assert cluster.gateway.metric("glmimage_gateway_previews_total", outcome="skipped") - skipped_before == 2
    plain = client.generate(PROMPT, 256, 256, seed=9, num_inference_steps=4)
    assert plain.image == result.image


def test_server_info_reports_both_stages(client):
    info = client.server_info()
    assert info.role == common_pb2.SERVICE_ROLE_GATEWAY
    roles = sorted(s.role for s in info.stages)
    assert roles == [common_pb2.SERVICE_ROLE_PLANNER] * 2 + [common_pb2.SERVICE_ROLE_DECODER] * 2
    assert info.plan_formats_match and info.plan_format.startswith("glm-image/vq64/")


def test_bad_input_is_rejected_with_the_stage_named(client, cluster):
    with pytest.raises(grpc.RpcError) as error:
        client.generate(PROMPT, 250, 256)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "width must be a multiple of 32" in error.value.details()
    details = error_details(error.value)
    assert (details.reason, details.stage, details.fields[0][0]) == ("INVALID_REQUEST", "gateway", "width")
    with pytest.raises(grpc.RpcError) as error:
        client.generate(PROMPT, 256, 256, condition_images=[b"not an image"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # both stages check the image, at the same time: whichever answers first is named
    stage, _, message = error.value.details().partition(": ")
    assert stage in ("planner", "decoder") and message.startswith("condition_images[0]")
    details = error_details(error.value)  # the stage's typed details, passed through the gateway
    assert (details.reason, details.stage, details.fields) == (
        "INVALID_REQUEST",
        stage,
        (("condition_images[0]", message),),
    )
    assert health_status(cluster.gateway.address) == SERVING


def test_deadline_exceeded_stops_both_stages(client, cluster):
    with pytest.raises(grpc.RpcError) as error:
        client.generate(PROMPT, 512, 512, num_inference_steps=100, timeout=1.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(cluster) < 2.0


@pytest.mark.parametrize("stage", [common_pb2.STAGE_PLANNING, common_pb2.STAGE_DECODING])
def test_client_cancellation_stops_both_stages(cluster, stage):
    from glmimage.v1 import image_service_pb2, image_service_pb2_grpc

    with grpc.insecure_channel(cluster.gateway.address) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)
        call = stub.Generate(image_service_pb2.GenerateRequest(prompt=PROMPT, width=512, height=512,
                                                               num_inference_steps=100))  # fmt: skip
        for event in call:
            if event.WhichOneof("event") == "progress" and event.progress.stage == stage:
                break
        call.cancel()
    assert wait_idle(cluster) < 2.0


def test_decoder_killed_mid_denoise_is_replaced_without_replanning(client, cluster):
    plans_before = completed_plans(cluster)
    killed = []

    def on_progress(stage, done, total):
        if stage == common_pb2.STAGE_DECODING and done == 2 and not killed:
            busy = [s for s in stages(cluster, "decoder") if s.metric("glmimage_requests_in_flight", stage="decoder")]
            busy[0].signal(signal.SIGKILL)
            killed.append(busy[0])

    result = client.generate(PROMPT, 256, 256, seed=2, num_inference_steps=100, on_progress=on_progress)
    assert killed and result.completed.decoder_attempts == 2 and result.completed.planner_attempts == 1
    assert completed_plans(cluster) - plans_before == 1, "the plan was replayed, not generated again"
    restart(killed[0])


def test_planner_killed_before_its_first_token_is_replaced(client, cluster):
    victim = stages(cluster, "planner")[0]
    victim.signal(signal.SIGKILL)
    victim.process.wait()
    result = client.generate(PROMPT, 256, 256, seed=4, num_inference_steps=2)
    assert result.completed.planner_attempts in (1, 2) and len(result.image) > 0
    restart(victim)


def test_planner_killed_mid_plan_is_restarted_on_another(client, cluster, pipe):
    killed = []

    def on_progress(stage, done, total):
        if stage == common_pb2.STAGE_PLANNING and done >= 64 and not killed:
            busy = [s for s in stages(cluster, "planner") if s.metric("glmimage_requests_in_flight", stage="planner")]
            busy[0].signal(signal.SIGKILL)
            killed.append(busy[0])

    result = client.generate(PROMPT, 512, 256, seed=6, num_inference_steps=2, on_progress=on_progress)
    assert killed and result.completed.planner_attempts == 2
    # the decoder restarted on the new plan: the image is the one the whole plan gives
    expected = reference.render(pipe, PROMPT, 512, 256, seed=6, steps=2)
    assert np.array_equal(pixels(result.image), np.asarray(expected))
    restart(killed[0])


def test_concurrent_requests_all_complete(client):
    results, errors = [], []

    def one(seed):
        try:
            results.append(client.generate(PROMPT, 256, 256, seed=seed, num_inference_steps=2))
        except grpc.RpcError as error:
            errors.append(error)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 4


@pytest.mark.parametrize("case", ["1024x1024 PNG", "333x777 PNG", "4000x3000 JPEG shown portrait (EXIF)"])
def test_image_to_image_with_any_photo_equals_the_monolithic_pipeline_given_the_resized_image(client, pipe, case):
    make, size = CONDITION_CASES[case]
    data = make()
    result = client.generate(PROMPT, 256, 256, seed=5, num_inference_steps=2, condition_images=[data])
    expected = reference.render(pipe, PROMPT, 256, 256, seed=5, steps=2, images=[model_input(data, size)])
    assert np.array_equal(pixels(result.image), np.asarray(expected))


def test_four_condition_images_at_the_byte_limit_pass_every_hop(client):
    """The documented limits (4 images of 8 MiB) fit the message limits of client, gateway and stages."""
    images = [png_of_size(8 * 1024 * 1024, seed=i) for i in range(4)]
    result = client.generate(PROMPT, 256, 256, seed=1, num_inference_steps=1, condition_images=images)
    assert result.completed.width == 256 and len(result.image) > 0


def test_graceful_shutdown_exits_zero(cluster):
    codes = cluster.stop()
    assert codes == {name: 0 for name in codes}, codes
