"""The planner's settings: flags and PLANNER_* environment (vLLM's own engine flags pass through)."""

from typing import Literal

from pydantic_settings import SettingsConfigDict

from servekit.settings import ServerSettings, option


class PlannerSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="PLANNER_")

    model: str = option("", "checkpoint folder in the zai-org/GLM-Image layout")
    engine: Literal["vllm", "transformers"] = option("vllm", "generation engine")
    port: int = option(50051, "gRPC port", ge=0, le=65535)
    metrics_port: int = option(9091, "Prometheus /metrics port (0 = off)", ge=0, le=65535)
    max_in_flight: int = option(
        0, "plans generated at once (0 = engine default: 64 for vllm, 1 for transformers)", ge=0
    )
    max_queued: int = option(64, "plans waiting for a slot before RESOURCE_EXHAUSTED", ge=0)
    chunk_tokens: int = option(32, "most tokens per PlanTokens message", ge=1)
    chunk_interval_seconds: float = option(0.05, "a partial chunk is sent once its first token is this old", ge=0)
    device: str = option("", "transformers engine device (default: cuda when available, else cpu)")

    def check(self) -> None:
        super().check()
        if not self.model:
            raise ValueError("--model (PLANNER_MODEL) is required: a GLM-Image checkpoint folder")
