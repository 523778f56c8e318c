# AR planner image: vLLM engine + the project's GLM-Image AR model plugin, served over gRPC.
#
#   docker build -f docker/planner.Dockerfile -t glm-image-serve/planner:0.1.0 .
#   docker run --gpus '"device=0"' --shm-size 16g -v /path/to/GLM-Image:/models/glm-image:ro \
#       -p 50051:50051 -p 9091:9091 glm-image-serve/planner:0.1.0 --tensor-parallel-size 1
#
# Base: a slim Python image, not nvidia/cuda. The pinned torch and vllm wheels from PyPI carry
# their own CUDA user-space libraries (cuBLAS, cuDNN, NCCL... as nvidia-* wheels); the driver
# (libcuda) is injected from the host by the NVIDIA container toolkit. An nvidia/cuda runtime base
# would only add a second, possibly mismatched copy of those libraries. The host driver must be
# new enough for the CUDA version the torch wheel was built with.
# Python 3.11 matches the interpreter the project is developed and tested with (scripts/setup.sh).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: the pinned GPU stack in /opt/venv, then the contract stubs and the project itself.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first (the slow, rarely changing layer): the GPU stack and the stub generator are
# resolved together, exactly as scripts/setup.sh does, so the protobuf runtime matches the stubs.
COPY requirements/gpu.txt requirements/gateway.txt requirements/build.txt requirements/
RUN pip install -r requirements/gpu.txt -r requirements/build.txt
# Then the source. Stubs are generated from protos/ (never copied from a checkout).
COPY protos/ protos/
RUN python protos/generate.py /src
COPY pyproject.toml ./
COPY servekit/ servekit/
COPY imagekit/ imagekit/
COPY planner_service/ planner_service/
# A real (non-editable) install: it registers the `vllm.general_plugins` entry point, which is how
# vLLM's engine-core and worker processes find the GLM-Image AR model. grpcio-tools is only needed
# for the stubs, so it leaves the venv afterwards.
RUN pip install --no-deps --no-build-isolation /src \
    && pip uninstall -y grpcio-tools

# ---------------------------------------------------------------------------------------------
# runtime
FROM ${PYTHON_IMAGE} AS runtime
# Triton (used by vLLM and torch.compile) builds small C launchers at run time: it needs a C
# compiler. Debian package versions follow the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /models /home/app/.cache \
    && chown 10001:10001 /home/app/.cache
COPY --from=build /opt/venv /opt/venv
# Weights are mounted at /models (read-only), never baked in; HF_HUB_OFFLINE keeps the service from
# ever reaching for a hub at run time. Caches (vLLM, torch.compile, Triton) live under $HOME/.cache.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PLANNER_MODEL=/models/glm-image \
    PLANNER_PORT=50051 \
    PLANNER_METRICS_PORT=9091
USER 10001:10001
WORKDIR /home/app
# gRPC (health, reflection, PlannerService) and Prometheus /metrics
EXPOSE 50051 9091
# grpc.health.v1 overall status: SERVING only once the model is loaded and warmed up. The start
# period covers loading a checkpoint and capturing CUDA graphs. sh -c lets the address follow a
# PLANNER_PORT override; any failure maps to exit 1 (unhealthy).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30m --retries=3 \
    CMD ["sh", "-c", "python -m servekit.healthcheck --address 127.0.0.1:${PLANNER_PORT} || exit 1"]
ENTRYPOINT ["python", "-m", "planner_service"]
