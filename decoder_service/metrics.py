"""The decoder's Prometheus metrics (served on --metrics-port), labelled stage="decoder"."""

from prometheus_client import Counter, Histogram

STAGE = "decoder"

_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LONG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

DENOISE_STEP_SECONDS = Histogram(
    "glmimage_decoder_denoise_step_seconds", "Duration of one denoising step (both CFG branches)", ["stage"],
    buckets=_STEP_BUCKETS,
).labels(STAGE)  # fmt: skip
DECODE_SECONDS = Histogram(
    "glmimage_decoder_decode_seconds", "A Decode call from its spec to its last event", ["stage"],
    buckets=_LONG_BUCKETS,
).labels(STAGE)  # fmt: skip
QUEUE_SECONDS = Histogram(
    "glmimage_decoder_queue_seconds", "Time a complete plan waited for a denoising slot", ["stage"],
    buckets=_LONG_BUCKETS,
).labels(STAGE)  # fmt: skip
TAIL_SECONDS = Histogram(
    "glmimage_decoder_tail_seconds", "From the plan's last target id to the last event (what planning does not hide)",
    ["stage"], buckets=_LONG_BUCKETS,
).labels(STAGE)  # fmt: skip
PREVIEWS = Counter(
    "glmimage_decoder_previews",
    "Preview images by kind (plan: a plan's preview grid; denoising: a decode's "
    "estimate) and outcome (sent; skipped: the decoder was needed for full images; preempted: stopped for one)",
    ["stage", "kind", "outcome"],
)
