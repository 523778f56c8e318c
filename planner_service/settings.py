"""The planner's settings: flags and PLANNER_* environment (vLLM's own engine flags pass through)."""

from dataclasses import dataclass

from servekit.settings import ServerSettings, option

ENGINES = ("vllm", "transformers")


@dataclass
class PlannerSettings(ServerSettings):
    model: str = option("", "checkpoint folder in the zai-org/GLM-Image layout")
    engine: str = option("vllm", "generation engine", choices=ENGINES)
    port: int = option(50051, "gRPC port")
    metrics_port: int = option(9091, "Prometheus /metrics port (0 = off)")
    max_in_flight: int = option(0, "plans generated at once (0 = engine default: 64 for vllm, 1 for transformers)")
    max_queued: int = option(64, "plans waiting for a slot before RESOURCE_EXHAUSTED")
    chunk_tokens: int = option(32, "most tokens per PlanTokens message")
    chunk_interval_seconds: float = option(0.05, "a partial chunk is sent once its first token is this old")
    device: str = option("", "transformers engine device (default: cuda when available, else cpu)")

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ValueError("--model (PLANNER_MODEL) is required: a GLM-Image checkpoint folder")
        if self.max_in_flight < 0 or self.max_queued < 0 or self.chunk_tokens < 1:
            raise ValueError("--max-in-flight and --max-queued must be >= 0, --chunk-tokens >= 1")
        if self.chunk_interval_seconds < 0:
            raise ValueError("--chunk-interval-seconds must be >= 0")
