"""Reading the state of stage processes in e2e tests: who is busy, health, restarts."""

import io
import os
import time

import grpc
import numpy as np
from PIL import Image
from servers import SERVING, health_status


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def health_status_or_none(address: str):
    try:
        return health_status(address)
    except grpc.RpcError:
        return None


def busy_pod(pods, kind: str):
    """The first pod of `kind` with a request in flight."""
    return next(p for p in pods if p.alive() and p.metric("glmimage_requests_in_flight", stage=kind))


def restart(pod, gateway_settle_s: float = 1.5) -> None:
    """Starts a stopped pod again and waits until it is SERVING and the gateway has seen it."""
    pod.start({**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while health_status_or_none(pod.address) != SERVING:
        assert time.monotonic() < deadline, f"{pod.name} did not come back"
        assert pod.alive(), f"{pod.name} exited; see {pod.log_path}"
        time.sleep(0.5)
    time.sleep(gateway_settle_s)  # the gateway's next health check sees it
