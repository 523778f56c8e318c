"""A small Python client for ImageService.

from gateway.client import ImageClient
with ImageClient("127.0.0.1:50050") as client:
    result = client.generate("a poster that says 'HELLO'", width=512, height=512, seed=7, previews=2,
                             on_progress=lambda stage, done, total: ...)
open("image.png", "wb").write(result.image)
for preview in result.previews:  # small images that came while it was made (best effort)
    print(preview.index, preview.width, preview.height, f"{preview.seconds:.1f} s")
"""

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from glmimage.v1 import common_pb2, image_service_pb2, image_service_pb2_grpc

FORMATS = {"png": common_pb2.IMAGE_FORMAT_PNG, "jpeg": common_pb2.IMAGE_FORMAT_JPEG,
           "webp": common_pb2.IMAGE_FORMAT_WEBP}  # fmt: skip


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call's google.rpc details say (empty fields when it carried none)."""

    reason: str = ""  # stable: INVALID_REQUEST, OVERLOADED, NO_REPLICA, STALLED, ...
    stage: str = ""  # gateway, planner or decoder
    fields: tuple[tuple[str, str], ...] = ()  # (field, what is wrong with it)
    retry_after_s: float | None = None

    def lines(self) -> list[str]:
        lines = [f"reason {self.reason} (stage {self.stage})"] if self.reason else []
        lines += [f"field {name}: {description}" for name, description in self.fields]
        if self.retry_after_s is not None:
            lines.append(f"retry after {self.retry_after_s:g} s")
        return lines


def error_details(error: grpc.RpcError) -> ErrorDetails:
    status = rpc_status.from_call(error)
    return ErrorDetails() if status is None else read_details(status.details)


def read_details(details: Sequence[any_pb2.Any]) -> ErrorDetails:
    """What packed google.rpc details say."""
    reason = stage = ""
    fields: list[tuple[str, str]] = []
    retry_after = None
    for detail in details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, stage = info.reason, info.metadata.get("stage", "")
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return ErrorDetails(reason, stage, tuple(fields), retry_after)


@dataclass(frozen=True)
class Preview:
    index: int
    stage: common_pb2.Stage  # STAGE_PLANNING (the plan's preview grid) or STAGE_DECODING (a denoising estimate)
    width: int
    height: int
    format: common_pb2.ImageFormat
    data: bytes  # the encoded image
    seconds: float  # when it arrived, from the start of the call


@dataclass
class GeneratedImage:
    image: bytes  # the encoded image
    accepted: image_service_pb2.Accepted
    completed: common_pb2.Completed
    previews: list[Preview] = field(default_factory=list)


class ImageClient:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None, api_key: str = ""):
        # No send limit of its own (gRPC's default): the gateway's limits decide what a request may hold.
        self.channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.stub = image_service_pb2_grpc.ImageServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def generate(
        self,
        prompt: str,
        width: int,
        height: int,
        *,
        seed: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        condition_images: Sequence[bytes] = (),
        output_format: str = "png",
        output_quality: int | None = None,
        previews: int = 0,
        request_id: str = "",
        timeout: float | None = None,
        on_progress: Callable[[common_pb2.Stage, int, int], None] | None = None,
        on_preview: Callable[[Preview], None] | None = None,
    ) -> GeneratedImage:
        """Blocks until the image is complete; `on_progress(stage, done, total)` is called for each
        progress event (stage is common_pb2.STAGE_PLANNING or STAGE_DECODING), `on_preview` for each
        of the (at most `previews`) previews as it arrives. Raises grpc.RpcError."""
        request = image_service_pb2.GenerateRequest(
            request_id=request_id,
            prompt=prompt,
            width=width,
            height=height,
            seed=seed,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            sampling=common_pb2.PlanSampling(temperature=temperature, top_p=top_p, top_k=top_k),
            condition_images=[common_pb2.InputImage(data=data) for data in condition_images],
            output_format=FORMATS[output_format],
            output_quality=output_quality,
            previews=previews,
        )
        accepted, chunks, completed, received = None, [], None, []
        started = time.perf_counter()
        for event in self.stub.Generate(request, timeout=timeout, metadata=self.metadata):
            kind = event.WhichOneof("event")
            if kind == "accepted":
                accepted = event.accepted
            elif kind == "progress":
                if on_progress:
                    on_progress(event.progress.stage, event.progress.done, event.progress.total)
            elif kind == "preview":
                p = event.preview
                preview = Preview(p.index, p.stage, p.width, p.height, p.format, p.data, time.perf_counter() - started)
                received.append(preview)
                if on_preview:
                    on_preview(preview)
            elif kind == "image_chunk":
                chunks.append(event.image_chunk.data)
            else:
                completed = event.completed
        if completed is None:
            raise RuntimeError("the stream ended without a completed event")
        if accepted is None:
            raise RuntimeError("the stream had no accepted event")
        image = b"".join(chunks)
        if hashlib.sha256(image).hexdigest() != completed.sha256:
            raise RuntimeError("the image's sha256 does not match the server's")
        return GeneratedImage(image=image, accepted=accepted, completed=completed, previews=received)

    def server_info(self, timeout: float = 10) -> common_pb2.ServerInfo:
        return self.stub.GetServerInfo(common_pb2.GetServerInfoRequest(), timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ImageClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
