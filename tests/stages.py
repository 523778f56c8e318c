"""Reading the state of stage processes in e2e tests: metrics, logs, health, restarts."""

import io
import time
import urllib.request

import grpc
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from servers import SERVING, health_status


def metric(service, name: str, **labels) -> float:
    """One sample from a service's /metrics endpoint (0 when absent)."""
    with urllib.request.urlopen(f"http://{service.host}:{service.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def health_status_or_none(address: str):
    try:
        return health_status(address)
    except grpc.RpcError:
        return None


def busy_pod(pods, kind: str):
    """The first pod of `kind` with a request in flight."""
    return next(p for p in pods if p.alive() and metric(p, "glmimage_requests_in_flight", stage=kind))


def decoded_ids(pod) -> str:
    """The decoder's log: one 'decoded <request id>' line per image."""
    return pod.log_path.read_text()


def restart(pod, gateway_settle_s: float = 1.5) -> None:
    """Starts a stopped pod again and waits until it is SERVING and the gateway has seen it."""
    pod.start({**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while health_status_or_none(pod.address) != SERVING:
        assert time.monotonic() < deadline, f"{pod.name} did not come back"
        assert pod.alive(), f"{pod.name} exited; see {pod.log_path}"
        time.sleep(0.5)
    time.sleep(gateway_settle_s)  # the gateway's next health check sees it
