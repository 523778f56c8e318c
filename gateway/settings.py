"""The gateway's settings: flags and GATEWAY_* environment."""

from dataclasses import dataclass

from servekit.settings import ServerSettings, option


@dataclass
class GatewaySettings(ServerSettings):
    planner: str = option("127.0.0.1:50051", "planner targets, comma-separated (host:port or dns:///name:port)")
    decoder: str = option("127.0.0.1:50052", "decoder targets, comma-separated (host:port or dns:///name:port)")
    port: int = option(50050, "gRPC port")
    metrics_port: int = option(9090, "Prometheus /metrics port (0 = off)")
    max_in_flight: int = option(256, "requests served at once")
    max_queued: int = option(256, "requests waiting for a slot before RESOURCE_EXHAUSTED")
    planner_attempts: int = option(3, "most planner replicas one request may try")
    decoder_attempts: int = option(3, "most decoder replicas one request may try")
    default_timeout_seconds: float = option(600.0, "deadline for requests that carry none")
    health_interval_seconds: float = option(1.0, "how often each stage replica's health is checked")
    stage_tls_ca_file: str = option("", "PEM CA bundle: talk TLS to the stages, verifying their certificates")

    def validate(self) -> None:
        super().validate()
        if not self.planner_targets() or not self.decoder_targets():
            raise ValueError("--planner and --decoder each need at least one target")
        if min(self.max_in_flight, self.planner_attempts, self.decoder_attempts) < 1 or self.max_queued < 0:
            raise ValueError("--max-in-flight and the attempt counts must be >= 1, --max-queued >= 0")

    def planner_targets(self) -> list[str]:
        return [t.strip() for t in self.planner.split(",") if t.strip()]

    def decoder_targets(self) -> list[str]:
        return [t.strip() for t in self.decoder.split(",") if t.strip()]
