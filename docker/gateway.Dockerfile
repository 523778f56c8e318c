# Gateway image: the public ImageService, and the OpenAI-compatible Images API over HTTP with
# --http-port. No torch, no CUDA: grpcio, health, reflection, status, prometheus-client, and FastAPI
# on uvicorn (requirements/gateway.txt).
#
#   docker build -f docker/gateway.Dockerfile -t glm-image-serve/gateway:0.1.0 .
#   docker run -p 50050:50050 -p 8000:8000 -p 9090:9090 glm-image-serve/gateway:0.1.0 \
#       --planner dns:///planner:50051 --decoder dns:///decoder:50052 --http-port 8000
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: the gateway's dependencies in /opt/venv, then the contract stubs and the project.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first; resolved together with the stub generator so protobuf matches the stubs.
COPY requirements/gateway.txt requirements/build.txt requirements/
RUN pip install -r requirements/gateway.txt -r requirements/build.txt
COPY protos/ protos/
RUN python protos/generate.py /src
COPY pyproject.toml ./
COPY servekit/ servekit/
COPY gateway/ gateway/
RUN pip install --no-deps --no-build-isolation /src \
    && pip uninstall -y grpcio-tools

# ---------------------------------------------------------------------------------------------
# runtime
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_PORT=50050 \
    GATEWAY_METRICS_PORT=9090
USER 10001:10001
WORKDIR /home/app
# gRPC (health, reflection, ImageService), the HTTP API when --http-port 8000, Prometheus /metrics
EXPOSE 50050 8000 9090
# grpc.health.v1 overall status. sh -c lets the address follow a GATEWAY_PORT override; any
# failure maps to exit 1 (unhealthy).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "python -m servekit.healthcheck --address 127.0.0.1:${GATEWAY_PORT} || exit 1"]
ENTRYPOINT ["python", "-m", "gateway"]
