"""The decoder's settings: every field is a `--flag` and a `DECODER_*` environment variable."""

from typing import Literal

from pydantic_settings import SettingsConfigDict

from servekit.settings import ServerSettings, option
from servekit.validation import SIZE_MULTIPLE

MAX_CHUNK_BYTES = 1024 * 1024  # the contract: image chunks are at most 1 MiB


class DecoderSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="DECODER_")

    model: str = option("", "checkpoint directory in the zai-org/GLM-Image layout")
    port: int = option(50052, "gRPC port (0: any free port)", ge=0, le=65535)
    metrics_port: int = option(9092, "Prometheus /metrics port (0: none)", ge=0, le=65535)
    device: str = option("cpu", "torch device: cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weights and activations dtype; auto: float32 on cpu, bfloat16 on cuda"
    )
    plan_format: str = option(
        "", "plan format this decoder accepts; empty: computed from the checkpoint's AR codebook "
        "(set it, to the planner's GetServerInfo value, when the AR folder is not mounted)",
    )  # fmt: skip
    max_concurrent_decodes: int = option(
        1, "decodes in flight per model instance; they share one worker thread step by step, so a decode "
        "waiting for its plan leaves the device to the others", ge=1,
    )  # fmt: skip
    max_queued: int = option(
        8, "decodes admitted without a denoising slot (preparing, waiting for their plan or a slot; each holds "
        "prepared state in memory); beyond this RESOURCE_EXHAUSTED (at least 1: every call waits without a "
        "slot until its plan is complete)", ge=1,
    )  # fmt: skip
    plan_stall_timeout_seconds: float = option(
        60.0, "a call whose plan is incomplete and gets no chunk for this long is ended (ABORTED)", gt=0
    )
    heartbeat_seconds: float = option(5.0, "a complete plan waiting for a slot sends Progress(done=0) this often", gt=0)
    default_steps: int = option(50, "denoising steps when a request leaves them unset")
    default_guidance_scale: float = option(1.5, "CFG scale when a request leaves it unset")
    chunk_bytes: int = option(
        MAX_CHUNK_BYTES, "size of the image chunks streamed back (at most 1 MiB)", ge=1, le=MAX_CHUNK_BYTES
    )
    png_compress_level: int = option(1, "zlib level of PNG output, 0-9 (higher: smaller files, slower)", ge=0, le=9)
    warm_up: bool = option(True, "run one minimal decode before reporting SERVING")
    preview_steps: int = option(8, "denoising steps of a plan preview (the plan's preview grid, rendered small)", ge=1)
    preview_max_side: int = option(
        512, "denoising previews are the image at half its side, or a quarter when half is above this (pixels)",
        ge=SIZE_MULTIPLE,
    )  # fmt: skip

    def check(self) -> None:
        super().check()
        if not self.model:
            raise ValueError("--model (DECODER_MODEL) is required: a GLM-Image checkpoint folder")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        limits = self.limits()  # raises on bad sides/steps
        if not limits.min_steps <= self.default_steps <= limits.max_steps:
            raise ValueError(f"--default-steps must be between 1 and --max-steps ({limits.max_steps})")
        if not 0 <= self.default_guidance_scale <= limits.max_guidance_scale:
            raise ValueError(f"--default-guidance-scale must be between 0 and {limits.max_guidance_scale}")
