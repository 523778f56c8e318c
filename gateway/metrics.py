"""The gateway's Prometheus metrics (served on --metrics-port)."""

from prometheus_client import Counter, Gauge, Histogram

RETRIES = Counter("glmimage_gateway_retries", "Requests moved to another replica, by stage", ["stage"])
LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
END_TO_END_SECONDS = Histogram("glmimage_gateway_end_to_end_seconds", "Accepted to completed", buckets=LATENCY_BUCKETS)
FIRST_PLAN_TOKEN_SECONDS = Histogram(
    "glmimage_gateway_first_plan_token_seconds", "Accepted to the first plan token", buckets=LATENCY_BUCKETS
)
PREVIEWS = Counter(
    "glmimage_gateway_previews",
    "Preview images asked for, by outcome (sent; skipped: no decoder had room)",
    ["outcome"],
)
# Per-stage demand as this gateway sees it (what the stages' own gauges cannot see): scale on these.
STAGE_WAITING = Gauge(
    "glmimage_gateway_stage_waiting", "Admitted requests waiting for a replica of the stage with room", ["stage"]
)
STAGE_IN_SERVICE = Gauge("glmimage_gateway_stage_in_service", "Requests this gateway has on the stage", ["stage"])
# Per API key (its name in --api-keys-file; "anonymous" on an open gateway; "" for no valid key).
KEY_REQUESTS = Counter(
    "glmimage_gateway_key_requests",
    "Requests by API key name and outcome (admitted, rate_limited, unauthenticated)",
    ["key", "outcome"],
)
KEY_IN_FLIGHT = Gauge("glmimage_gateway_key_in_flight", "Requests in flight by API key name", ["key"])
