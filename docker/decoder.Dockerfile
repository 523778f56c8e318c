# DiT decoder image: diffusers GLM-Image DiT + VAE + glyph encoder, served over gRPC.
#
#   docker build -f docker/decoder.Dockerfile -t glm-image-serve/decoder:0.1.0 .
#   docker run --gpus '"device=1"' -v /path/to/GLM-Image:/models/glm-image:ro \
#       -p 50052:50052 -p 9092:9092 glm-image-serve/decoder:0.1.0
#
# Base: a slim Python image, not nvidia/cuda. The pinned torch wheel from PyPI carries its own
# CUDA user-space libraries (nvidia-* wheels); the driver (libcuda) is injected from the host by
# the NVIDIA container toolkit. The host driver must be new enough for the torch wheel's CUDA.
# The decoder shares requirements/gpu.txt with the planner, so both run the same pinned stack.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: the pinned GPU stack in /opt/venv, then the contract stubs and the project itself.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first; resolved together with the stub generator, as scripts/setup.sh does.
COPY requirements/gpu.txt requirements/gateway.txt requirements/build.txt requirements/
RUN pip install -r requirements/gpu.txt -r requirements/build.txt
COPY protos/ protos/
RUN python protos/generate.py /src
COPY pyproject.toml ./
COPY servekit/ servekit/
COPY imagekit/ imagekit/
COPY decoder_service/ decoder_service/
RUN pip install --no-deps --no-build-isolation /src \
    && pip uninstall -y grpcio-tools

# ---------------------------------------------------------------------------------------------
# runtime
FROM ${PYTHON_IMAGE} AS runtime
# Triton (torch.compile kernels) builds small C launchers at run time: it needs a C compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /models /home/app/.cache \
    && chown 10001:10001 /home/app/.cache
COPY --from=build /opt/venv /opt/venv
# Weights are mounted at /models (read-only), never baked in.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    DO_NOT_TRACK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DECODER_MODEL=/models/glm-image \
    DECODER_PORT=50052 \
    DECODER_METRICS_PORT=9092 \
    DECODER_DEVICE=cuda
USER 10001:10001
WORKDIR /home/app
# gRPC (health, reflection, DecoderService) and Prometheus /metrics
EXPOSE 50052 9092
# grpc.health.v1 overall status: SERVING only once the pipeline is loaded and warmed up. sh -c
# lets the address follow a DECODER_PORT override; any failure maps to exit 1 (unhealthy).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20m --retries=3 \
    CMD ["sh", "-c", "python -m servekit.healthcheck --address 127.0.0.1:${DECODER_PORT} || exit 1"]
ENTRYPOINT ["python", "-m", "decoder_service"]
