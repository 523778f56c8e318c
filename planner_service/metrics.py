"""The planner's Prometheus metrics (served on --metrics-port)."""

from prometheus_client import Counter, Histogram

QUEUE_SECONDS = Histogram("glmimage_planner_queue_seconds", "Wait for an engine slot")
FIRST_TOKEN_SECONDS = Histogram(
    "glmimage_planner_first_token_seconds", "From request arrival to the first plan token",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
PLAN_SECONDS = Histogram(
    "glmimage_planner_plan_seconds", "From request arrival to the last plan token",
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)  # fmt: skip
TOKENS = Counter("glmimage_planner_tokens", "Plan tokens generated")
# vLLM's own engine metrics, on the same port (its engine registers them in this process's registry while
# it logs stats, as it does unless --disable-log-stats): those the chart's dashboard shows, checked by
# tests/service/test_vllm_engine.py.
VLLM_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
