"""Prints the names of the samples the services export, one per line, for scripts/check_chart.py (which
checks that the chart's queries name nothing else). Run with the project's .venv:

    .venv/bin/python scripts/metric_names.py

The names come from the Prometheus registry once the three services' metrics modules and servekit's
are imported, and from the vLLM metrics the planner serves and the dashboard shows
(planner_service.metrics.VLLM_METRICS, checked against a running vLLM engine by
tests/service/test_vllm_engine.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import REGISTRY  # noqa: E402

import decoder_service.metrics  # noqa: E402, F401
import gateway.metrics  # noqa: E402, F401
import servekit.admission  # noqa: E402, F401
import servekit.metrics  # noqa: E402, F401
import servekit.plan_format  # noqa: E402, F401
from planner_service.metrics import VLLM_METRICS  # noqa: E402

# The samples of each metric type (the _created samples of counters and histograms left out).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


def main() -> None:
    names = {family.name + suffix for family in REGISTRY.collect() for suffix in SUFFIXES[family.type]}
    print("\n".join(sorted(names | set(VLLM_METRICS))))


if __name__ == "__main__":
    main()
