"""The gateway's settings: flags and GATEWAY_* environment."""

import math
from dataclasses import dataclass

from gateway.chain import ChainOptions
from gateway.discovery import Target
from servekit.settings import ServerSettings, option


@dataclass
class GatewaySettings(ServerSettings):
    planner: str = option(
        "127.0.0.1:50051", "planner targets, comma-separated (host:port or dns:///name:port; a name is "
        "re-resolved and each of its addresses is a replica)",
    )  # fmt: skip
    decoder: str = option("127.0.0.1:50052", "decoder targets, comma-separated (as --planner)")
    port: int = option(50050, "gRPC port")
    metrics_port: int = option(9090, "Prometheus /metrics port (0 = off)")
    max_in_flight: int = option(256, "requests served at once")
    max_queued: int = option(256, "requests waiting for a slot before RESOURCE_EXHAUSTED")
    planner_attempts: int = option(3, "most planner replicas one request may try")
    decoder_attempts: int = option(3, "most decoder replicas one request may try")
    default_timeout_seconds: float = option(600.0, "deadline for requests that carry none")
    health_interval_seconds: float = option(1.0, "how often each stage replica's health and load are checked")
    resolve_interval_seconds: float = option(5.0, "how often stage names are re-resolved (and at once after a failure)")
    stall_timeout_seconds: float = option(
        30.0, "a stage replica that should be working and sends nothing for this long has failed"
    )
    decoder_bind_lead_seconds: float = option(
        1.0, "bind a request to a decoder when its plan has about this long left (0: when complete; inf: at once)"
    )
    decoder_lookahead: int = option(1, "requests bound to a decoder beyond its denoising slots (ready to start)")
    stage_tls_ca_file: str = option("", "PEM CA bundle: talk TLS to the stages, verifying their certificates")
    http_port: int = option(0, "OpenAI-compatible Images API over HTTP on this port (0 = off)")
    served_model_name: str = option("glm-image", "the model name the HTTP API serves (`model`, /v1/models)")
    http_max_images: int = option(4, "most images (`n`) one HTTP request may ask for")
    http_api_key_file: str = option(
        "", "file holding the key HTTP clients must send as 'Authorization: Bearer KEY' (empty: none needed)"
    )

    def validate(self) -> None:
        super().validate()
        if not self.planner_targets() or not self.decoder_targets():
            raise ValueError("--planner and --decoder each need at least one target")
        for target in (*self.planner_targets(), *self.decoder_targets()):
            Target.parse(target)  # raises with the accepted forms
        if min(self.max_in_flight, self.planner_attempts, self.decoder_attempts) < 1 or self.max_queued < 0:
            raise ValueError("--max-in-flight and the attempt counts must be >= 1, --max-queued >= 0")
        if min(self.health_interval_seconds, self.resolve_interval_seconds, self.stall_timeout_seconds) <= 0:
            raise ValueError(
                "--health-interval-seconds, --resolve-interval-seconds and --stall-timeout-seconds must be > 0"
            )
        if self.decoder_bind_lead_seconds < 0 or math.isnan(self.decoder_bind_lead_seconds):
            raise ValueError("--decoder-bind-lead-seconds must be >= 0 (inf: bind at once)")
        if self.decoder_lookahead < 0:
            raise ValueError("--decoder-lookahead must be >= 0")
        if not 0 <= self.http_port <= 65535 or self.http_max_images < 1 or not self.served_model_name.strip():
            raise ValueError("--http-port must be 0..65535, --http-max-images >= 1, --served-model-name not empty")
        if self.http_api_key_file:
            self.http_api_key()  # raises when unreadable or empty

    def http_api_key(self) -> str:
        """The key in --http-api-key-file ("" when none is set)."""
        if not self.http_api_key_file:
            return ""
        try:
            with open(self.http_api_key_file, encoding="utf-8") as file:
                key = file.read().strip()
        except OSError as error:
            raise ValueError(f"--http-api-key-file: {error}") from None
        if not key:
            raise ValueError(f"--http-api-key-file: {self.http_api_key_file} is empty")
        return key

    def planner_targets(self) -> list[str]:
        return [t.strip() for t in self.planner.split(",") if t.strip()]

    def decoder_targets(self) -> list[str]:
        return [t.strip() for t in self.decoder.split(",") if t.strip()]

    def chain_options(self) -> ChainOptions:
        return ChainOptions(
            planner_attempts=self.planner_attempts,
            decoder_attempts=self.decoder_attempts,
            bind_lead_s=self.decoder_bind_lead_seconds,
            stall_s=self.stall_timeout_seconds,
        )
