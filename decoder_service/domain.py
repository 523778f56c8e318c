"""The decoder's domain types: what the servicer converts protos into and events back from.

Plain dataclasses, no gRPC and no torch, so that the plan logic and the runner are testable alone.
"""

import enum
from dataclasses import dataclass, field


class ImageFormat(enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


class Grid(enum.Enum):
    UNSPECIFIED = "unspecified"
    PREVIEW = "preview"
    TARGET = "target"


@dataclass(frozen=True)
class DecodeJob:
    """A validated DecodeSpec with the defaults applied."""

    request_id: str
    prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance_scale: float
    condition_images: tuple[bytes, ...]  # encoded PNG/JPEG/WebP, in the planned order
    output_format: ImageFormat = ImageFormat.PNG
    output_quality: int | None = None  # JPEG/WebP; None: images.LOSSY_QUALITY
    previews: int = 0  # denoising previews wanted


@dataclass(frozen=True)
class ConditionPlan:
    """A condition image's codebook grid as the planner tokenized it (d32, row-major)."""

    rows: int
    cols: int
    ids: tuple[int, ...]


@dataclass(frozen=True)
class PlanHeader:
    request_id: str
    target_rows: int
    target_cols: int
    preview_rows: int
    preview_cols: int
    codebook_size: int
    plan_format: str
    seed: int
    width: int
    height: int
    conditions: tuple[ConditionPlan, ...] = ()


@dataclass(frozen=True)
class PlanTokens:
    grid: Grid
    offset: int
    ids: tuple[int, ...]


@dataclass(frozen=True)
class PlanSummary:
    """The planner's closing chunk; the decoder needs nothing from it."""


PlanItem = PlanHeader | PlanTokens | PlanSummary


@dataclass(frozen=True)
class Plan:
    """A complete, validated plan: the target grid at d32, row-major."""

    header: PlanHeader
    target_ids: tuple[int, ...]


@dataclass
class Timings:
    queue_seconds: float = 0.0
    decoder_prepare_seconds: float = 0.0
    denoising_seconds: float = 0.0
    vae_decode_seconds: float = 0.0
    encode_seconds: float = 0.0
    total_seconds: float = 0.0
    previews_seconds: float = 0.0


@dataclass(frozen=True)
class Progress:
    done: int
    total: int


@dataclass(frozen=True)
class Preview:
    """A small image of the denoising estimate (Decode) or of the plan's preview grid (RenderPreview)."""

    index: int
    width: int
    height: int
    format: ImageFormat
    data: bytes


@dataclass(frozen=True)
class ImageChunk:
    data: bytes


@dataclass(frozen=True)
class Completed:
    request_id: str
    width: int
    height: int
    seed: int
    format: ImageFormat
    sha256: str
    size_bytes: int
    plan_tokens: int
    timings: Timings = field(default_factory=Timings)
    previews: int = 0  # previews sent


DecodeEvent = Progress | Preview | ImageChunk | Completed
