"""The v1 contract: names fixed by the API, enum conventions, and wire round-trips."""

import pytest

from glmimage.v1 import common_pb2, decoder_pb2, image_service_pb2, planner_pb2

pytestmark = pytest.mark.unit

MODULES = [common_pb2, planner_pb2, decoder_pb2, image_service_pb2]


def test_package_and_services():
    assert {m.DESCRIPTOR.package for m in MODULES} == {"glmimage.v1"}
    services = {
        name: {m.name: (m.input_type.name, m.output_type.name, m.server_streaming, m.client_streaming)
               for m in service.methods}
        for module in MODULES
        for name, service in module.DESCRIPTOR.services_by_name.items()
    }  # fmt: skip
    assert services == {
        "ImageService": {
            "Generate": ("GenerateRequest", "GenerateEvent", True, False),
            "GetServerInfo": ("GetServerInfoRequest", "ServerInfo", False, False),
        },
        "PlannerService": {
            "Plan": ("PlanRequest", "PlanChunk", True, False),
            "GetServerInfo": ("GetServerInfoRequest", "ServerInfo", False, False),
        },
        "DecoderService": {
            "Decode": ("DecodeRequest", "DecodeEvent", True, True),
            "RenderPreview": ("PreviewRequest", "PreviewImage", False, False),
            "GetServerInfo": ("GetServerInfoRequest", "ServerInfo", False, False),
        },
    }


def test_every_enum_starts_with_unspecified():
    for module in MODULES:
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper()
            assert enum.values[0].number == 0
            assert enum.values[0].name == f"{prefix}_UNSPECIFIED"
            assert all(v.name.startswith(prefix + "_") for v in enum.values)


@pytest.mark.parametrize(
    ("message", "oneof", "members"),
    [
        (image_service_pb2.GenerateEvent, "event", ["accepted", "progress", "image_chunk", "completed", "preview"]),
        (planner_pb2.PlanChunk, "chunk", ["header", "tokens", "summary"]),
        (decoder_pb2.DecodeRequest, "item", ["spec", "plan_chunk"]),
        (decoder_pb2.DecodeEvent, "event", ["progress", "image_chunk", "completed", "preview"]),
    ],
)
def test_stream_messages_are_oneofs(message, oneof, members):
    assert [f.name for f in message.DESCRIPTOR.oneofs_by_name[oneof].fields] == members


def test_optional_fields_track_presence():
    request = image_service_pb2.GenerateRequest(prompt="p", width=512, height=512)
    for name in ("seed", "num_inference_steps", "guidance_scale"):
        assert not request.HasField(name)
    request.seed = 0  # zero is a real seed, distinct from unset
    assert request.HasField("seed")
    sampling = common_pb2.PlanSampling(temperature=0.0)
    assert sampling.HasField("temperature") and not sampling.HasField("top_p")


def test_generate_request_round_trip():
    request = image_service_pb2.GenerateRequest(
        request_id="r1", prompt="a sign that says 'OPEN'", width=1024, height=768, seed=7,
        num_inference_steps=30, guidance_scale=1.5,
        sampling=common_pb2.PlanSampling(temperature=0.9, top_p=0.75, top_k=16384),
        condition_images=[common_pb2.InputImage(data=b"\x89PNG...")],
        output_format=common_pb2.IMAGE_FORMAT_WEBP,
    )  # fmt: skip
    decoded = image_service_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.output_format == common_pb2.IMAGE_FORMAT_WEBP


def test_plan_chunks_round_trip_through_decode_request():
    header = planner_pb2.PlanHeader(
        request_id="r1", target_rows=32, target_cols=32, preview_rows=16, preview_cols=16,
        codebook_size=16384, plan_format="glm-image/abc", seed=7, width=1024, height=1024,
        condition_images=[planner_pb2.ConditionImagePlan(rows=2, cols=3, ids=[1, 2, 3, 4, 5, 16383])],
    )  # fmt: skip
    tokens = planner_pb2.PlanTokens(grid=planner_pb2.GRID_TARGET, offset=64, ids=list(range(16380, 16384)))
    for chunk in (planner_pb2.PlanChunk(header=header), planner_pb2.PlanChunk(tokens=tokens)):
        wire = decoder_pb2.DecodeRequest(plan_chunk=chunk).SerializeToString()
        assert decoder_pb2.DecodeRequest.FromString(wire).plan_chunk == chunk


def test_a_full_target_grid_is_a_few_kilobytes():
    """The hand-off is tiny: a 1024x1024 plan (32x32 ids < 16384) fits in ~2 KB of varints."""
    tokens = planner_pb2.PlanTokens(grid=planner_pb2.GRID_TARGET, offset=0, ids=[16383] * 1024)
    assert len(tokens.SerializeToString()) < 2 * 1024 + 16
