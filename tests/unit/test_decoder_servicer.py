"""Proto <-> domain conversion of the decoder servicer, and the decoder's settings."""

import pytest

from decoder_service.domain import (
    Completed,
    ConditionPlan,
    Grid,
    ImageChunk,
    ImageFormat,
    PlanHeader,
    PlanSummary,
    PlanTokens,
    Progress,
    Timings,
)
from decoder_service.servicer import event_to_proto, job_from_proto, plan_item_from_proto
from decoder_service.settings import DecoderSettings
from glmimage.v1 import common_pb2, decoder_pb2, planner_pb2
from servekit.errors import InvalidRequest
from servekit.settings import parse_settings
from servekit.validation import Limits

pytestmark = pytest.mark.unit

LIMITS = Limits(min_side=256, max_side=1024)


def spec(**fields) -> decoder_pb2.DecodeSpec:
    values = dict(prompt="a 'sign'", width=512, height=256, seed=9)
    values.update(fields)
    return decoder_pb2.DecodeSpec(**values)


def test_defaults_apply_only_to_unset_fields():
    job = job_from_proto(spec(), LIMITS, default_steps=50, default_guidance_scale=1.5)
    assert (job.steps, job.guidance_scale, job.output_format) == (50, 1.5, ImageFormat.PNG)
    assert (job.width, job.height, job.seed, job.prompt) == (512, 256, 9, "a 'sign'")
    assert job.request_id  # generated when none is given
    job = job_from_proto(spec(num_inference_steps=3, guidance_scale=0.0), LIMITS, 50, 1.5)
    assert (job.steps, job.guidance_scale) == (3, 0.0)  # explicit zero guidance is kept (no CFG)


def test_request_id_precedence():
    assert job_from_proto(spec(request_id="spec"), LIMITS, 50, 1.5, request_id="meta").request_id == "spec"
    assert job_from_proto(spec(), LIMITS, 50, 1.5, request_id="meta").request_id == "meta"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (common_pb2.IMAGE_FORMAT_UNSPECIFIED, ImageFormat.PNG),
        (common_pb2.IMAGE_FORMAT_JPEG, ImageFormat.JPEG),
        (common_pb2.IMAGE_FORMAT_WEBP, ImageFormat.WEBP),
    ],
)
def test_output_formats(value, expected):
    assert job_from_proto(spec(output_format=value), LIMITS, 50, 1.5).output_format is expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"width": 200}, "width must be a multiple of 32 between 256 and 1024"),
        ({"height": 2048}, "height must be"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": "\x00\t"}, "prompt must not be empty"),
        ({"request_id": "req\r\n1"}, "request_id may hold only printable ASCII"),
        ({"output_format": 5}, "output_format must be PNG, JPEG or WebP, got 5"),
        ({"output_quality": 90}, "output_quality applies to JPEG and WebP only"),
        (
            {"output_format": common_pb2.IMAGE_FORMAT_JPEG, "output_quality": 0},
            "output_quality must be between 1 and 100",
        ),
        ({"previews": 4}, "previews must be between 0 and 3, got 4"),
        ({"condition_images": [common_pb2.InputImage()] * 5}, "at most 4 condition images"),
    ],
)
def test_invalid_specs(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        job_from_proto(spec(**fields), LIMITS, 50, 1.5)


def test_metadata_request_id_is_checked_too():
    with pytest.raises(InvalidRequest, match="request_id must be at most 128 characters"):
        job_from_proto(spec(), LIMITS, 50, 1.5, request_id="m" * 129)


def test_plan_chunks_to_domain():
    header = planner_pb2.PlanChunk(
        header=planner_pb2.PlanHeader(
            request_id="r", target_rows=8, target_cols=16, preview_rows=11, preview_cols=22, codebook_size=64,
            plan_format="f", seed=3, width=512, height=256,
            condition_images=[planner_pb2.ConditionImagePlan(rows=1, cols=2, ids=[4, 5])],
        )
    )  # fmt: skip
    assert plan_item_from_proto(header) == PlanHeader(
        request_id="r", target_rows=8, target_cols=16, preview_rows=11, preview_cols=22, codebook_size=64,
        plan_format="f", seed=3, width=512, height=256, conditions=(ConditionPlan(1, 2, (4, 5)),),
    )  # fmt: skip
    tokens = planner_pb2.PlanChunk(tokens=planner_pb2.PlanTokens(grid=planner_pb2.GRID_TARGET, offset=7, ids=[1, 2]))
    assert plan_item_from_proto(tokens) == PlanTokens(Grid.TARGET, 7, (1, 2))
    preview = planner_pb2.PlanChunk(tokens=planner_pb2.PlanTokens(grid=planner_pb2.GRID_PREVIEW, ids=[1]))
    assert plan_item_from_proto(preview).grid is Grid.PREVIEW
    unnamed = planner_pb2.PlanChunk(tokens=planner_pb2.PlanTokens(ids=[1]))
    assert plan_item_from_proto(unnamed).grid is Grid.UNSPECIFIED
    assert plan_item_from_proto(planner_pb2.PlanChunk(summary=planner_pb2.PlanSummary())) == PlanSummary()
    with pytest.raises(InvalidRequest, match="empty one"):
        plan_item_from_proto(planner_pb2.PlanChunk())


def test_events_to_proto():
    progress = event_to_proto(Progress(2, 5)).progress
    assert (progress.stage, progress.done, progress.total) == (common_pb2.STAGE_DECODING, 2, 5)
    assert event_to_proto(ImageChunk(b"abc")).image_chunk.data == b"abc"
    completed = event_to_proto(
        Completed(
            request_id="r", width=512, height=256, seed=3, format=ImageFormat.WEBP, sha256="00", size_bytes=10,
            plan_tokens=128, timings=Timings(queue_seconds=0.5, denoising_seconds=2.0, total_seconds=3.0),
        )
    ).completed  # fmt: skip
    assert (completed.format, completed.plan_tokens, completed.size_bytes) == (common_pb2.IMAGE_FORMAT_WEBP, 128, 10)
    assert (completed.timings.queue_seconds, completed.timings.denoising_seconds) == (0.5, 2.0)
    assert completed.decoder_attempts == 1


def test_settings_from_flags_and_environment(monkeypatch):
    monkeypatch.setenv("DECODER_PORT", "6000")
    monkeypatch.setenv("DECODER_MAX_CONCURRENT_DECODES", "2")
    settings, rest = parse_settings(DecoderSettings, ["--model", "/m", "--port", "7000", "--warm-up", "no"])
    assert (settings.model, settings.port, settings.max_concurrent_decodes, settings.warm_up) == ("/m", 7000, 2, False)
    assert (settings.metrics_port, settings.default_steps, settings.chunk_bytes) == (9092, 50, 1024 * 1024)
    assert settings.limits() == Limits()
    assert rest == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--chunk-bytes", str(2 * 1024 * 1024)],
        ["--device", "tpu"],
        ["--max-concurrent-decodes", "0"],
        ["--min-side", "500"],
        ["--default-steps", "101"],
        ["--tls-cert-file", "cert.pem"],
    ],
)
def test_bad_settings_stop_at_start_up(argv):
    with pytest.raises(SystemExit):
        parse_settings(DecoderSettings, argv)


def test_only_the_concrete_engine_imports_model_code():
    """The servicer, runner and plan logic never import torch (style: the three layers)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "decoder_service"
    heavy = {"torch", "diffusers", "transformers", "numpy"}
    for path in package.glob("*.py"):
        if path.name == "diffusers_engine.py":
            continue
        # imports at module level only: app.py imports the concrete engine inside a function
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not heavy & {name.split(".")[0] for name in names}, f"{path.name} imports {names}"
            assert "decoder_service.diffusers_engine" not in names, path.name
