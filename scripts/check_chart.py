"""Checks of the deployment files beyond what hadolint and `helm lint` see.

    python scripts/check_chart.py                 # run every check (scripts/lint_deploy.sh does)
    python scripts/check_chart.py --write-readme  # regenerate the chart README's values table

Runs in the .venv-deploy made by scripts/lint_deploy.sh: helm-python-sdk (Helm's Go SDK: lint,
render, schema validation, no cluster), kubernetes-validate (the Kubernetes API schemas), jsonschema,
PyYAML and promql-parser (Prometheus' PromQL grammar, in Rust). The metric names the services export
come from the project's .venv (scripts/metric_names.py). Prints one line per check and exits 1 if any
failed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import promql_parser
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "glm-image-serve"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
DOCKER = ROOT / "docker"
STAGES = ("planner", "decoder", "gateway")
GPU_STAGES = ("planner", "decoder")
RELEASE, NAMESPACE = "glm", "glm-test"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ("1.27", "1.33")
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
README_START, README_END = "<!-- values-table:start -->", "<!-- values-table:end -->"
# Objects of the whole release, not of one stage: kind -> the template it comes from.
RELEASE_WIDE = {
    "ServiceAccount": "serviceaccount.yaml",
    "ConfigMap": "configmap-dashboards.yaml",
    "PrometheusRule": "prometheusrule.yaml",
}
# kube-state-metrics series the dashboard and the alerts use (the services export the rest).
KUBE_STATE_METRICS = {"kube_deployment_spec_replicas", "kube_deployment_status_replicas_ready"}
ALERTS = {"GlmImageErrorRatio", "GlmImageQueueGrowing", "GlmImageLatencyHigh", "GlmImageNoReadyPods",
          "GlmImagePlanFormatMismatch"}  # fmt: skip

Manifest = dict[str, Any]


class Report:
    def __init__(self) -> None:
        self.failures = 0
        self.passes = 0

    def check(self, name: str, problems: list[str]) -> None:
        if problems:
            self.failures += 1
            print(f"FAIL {name}")
            for problem in problems:
                print(f"     - {problem}")
        else:
            self.passes += 1
            print(f"ok   {name}")

    def run(self, name: str, fn: Callable[[], list[str]]) -> None:
        try:
            problems = fn()
        except Exception as error:  # a check that crashes is a failed check
            problems = [f"{type(error).__name__}: {error}"]
        self.check(name, problems)


# ---------------------------------------------------------------------------------------------
# helpers


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict | None = None) -> list[Manifest]:
    """`helm template` of the chart: the rendered objects (NOTES.txt left out)."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document.setdefault("metadata", {}).setdefault("annotations", {})
                document["_template"] = path.rsplit("/", 1)[-1]
                objects.append(document)
    return objects


def render_error(values: dict) -> str | None:
    try:
        render(values)
    except helm.HelmError as error:
        return str(error)
    return None


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def component(obj: Manifest) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def main_container(deployment: Manifest) -> Manifest:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def arg_value(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
    return None


def scenarios() -> Iterator[tuple[str, dict]]:
    """Value sets every rendering check runs on: defaults, each example, and the optional paths."""
    yield "defaults", {}
    for example in EXAMPLES:
        yield f"examples/{example.name}", load_yaml(example)
    yield (
        "tls+monitors+autoscaling+dashboards+alerts, no NetworkPolicies",
        {
            "dashboards": {"enabled": True, "annotations": {"grafana_folder": "GLM-Image"}},
            "alerts": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "tls": {
                "enabled": True,
                "planner": {"secretName": "glm-planner-tls"},
                "decoder": {"secretName": "glm-decoder-tls"},
            },
            "networkPolicy": {"enabled": False},
            "planner": {
                "autoscaling": {"enabled": True},
                "metrics": {"serviceMonitor": {"enabled": True}},
            },
            "decoder": {
                "autoscaling": {"enabled": True},
                "metrics": {"serviceMonitor": {"enabled": True}},
            },
            "gateway": {
                "tls": {"enabled": True, "secretName": "glm-gateway-tls"},
                "autoscaling": {"enabled": True},
                "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
            },
        },
    )
    yield (
        "gateway http + API keys Secret + tls",
        {
            "gateway": {
                "tls": {"enabled": True, "secretName": "glm-gateway-tls"},
                "http": {"enabled": True},
                "apiKeys": {"existingSecret": "glm-api-keys", "secretKey": "keys.txt", "requestsPerMinute": 120},
            },
        },
    )
    yield (
        "mTLS + cert-manager + API key digests + narrowed NetworkPolicies",
        {
            "tls": {
                "enabled": True,
                "mutual": True,
                "certManager": {
                    "enabled": True,
                    "issuerRef": {"name": "glm-ca", "kind": "ClusterIssuer"},
                    "duration": "720h",
                    "renewBefore": "240h",
                    "gatewayDNSNames": ["images.example.com"],
                },
            },
            "networkPolicy": {
                "gatewayFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}],
                "stageFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "debug"}}}],
            },
            "gateway": {
                "tls": {"enabled": True},
                "http": {"enabled": True},
                "apiKeys": {
                    "entries": [
                        {"sha256": "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8", "name": "alice"},
                        {"sha256": "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3"},
                    ],
                    "requestsPerMinute": 60,
                    "maxInFlight": 4,
                },
                "metrics": {"podMonitor": {"enabled": True}},
            },
        },
    )
    yield (
        "mTLS with existing Secrets and a CA bundle, metrics open",
        {
            "tls": {
                "enabled": True,
                "mutual": True,
                "planner": {"secretName": "glm-planner-tls"},
                "decoder": {"secretName": "glm-decoder-tls"},
                "gatewayClient": {"secretName": "glm-gateway-client-tls"},
                "ca": {"secretName": "glm-ca-bundle", "key": "bundle.pem"},
                # ignored for every certificate named above
                "certManager": {"enabled": True, "issuerRef": {"name": "unused"}},
            },
            "networkPolicy": {"metricsFrom": []},
        },
    )
    yield (
        "existing claim + download + token + digest",
        {
            "model": {
                "existingClaim": "weights",
                "download": {"enabled": True, "revision": "0123456789abcdef", "tokenSecret": {"name": "hf"}},
            },
            "decoder": {"image": {"digest": "sha256:" + "a" * 64}},
        },
    )


# ---------------------------------------------------------------------------------------------
# Dockerfiles and compose


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage: [(INSTRUCTION, arguments)], as dockerfile-parse reads them."""
    stages: list[list[tuple[str, str]]] = []
    for item in DockerfileParser(path=str(path)).structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages and item["instruction"] != "COMMENT":
            stages[-1].append((item["instruction"], item["value"]))
    return stages


def check_dockerfile(stage: str) -> list[str]:
    path = DOCKER / f"{stage}.Dockerfile"
    problems = []
    text = path.read_text()
    stages = dockerfile_stages(path)
    if len(stages) < 2:
        problems.append("not multi-stage")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    if not base or not re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+(@sha256:[a-f0-9]{64})?", base.group(1)):
        problems.append("base image must be a pinned python:X.Y.Z-slim-<debian> (ARG PYTHON_IMAGE)")
    final = stages[-1] if stages else []
    instructions = [i for i, _ in final]
    users = [a for i, a in final if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("final stage must switch to a non-root USER")
    entrypoints = [a for i, a in final if i == "ENTRYPOINT"]
    package = {"planner": "planner_service", "decoder": "decoder_service", "gateway": "gateway"}[stage]
    if not entrypoints or json.loads(entrypoints[-1]) != ["python", "-m", package]:
        problems.append(f'ENTRYPOINT must be exec-form ["python", "-m", "{package}"]')
    if "HEALTHCHECK" not in instructions or "servekit.healthcheck" not in dict(final).get("HEALTHCHECK", ""):
        problems.append("final stage needs a HEALTHCHECK through servekit.healthcheck (grpc.health.v1)")
    # dependencies before source: in the build stage, `pip install -r` precedes any source COPY
    for instructions_of_stage in stages[:-1]:
        seen_install = False
        for instruction, args in instructions_of_stage:
            if instruction == "RUN" and "pip install -r" in args:
                seen_install = True
            if instruction == "COPY" and re.search(
                r"\b(servekit|imagekit|planner_service|decoder_service|gateway)/", args
            ):
                if not seen_install:
                    problems.append(f"source copied before the dependencies are installed: COPY {args}")
        if any(i == "COPY" and "pyproject.toml" in a for i, a in instructions_of_stage):
            if not any(i == "RUN" and "--no-deps" in a for i, a in instructions_of_stage):
                problems.append("the project must be installed with pip install --no-deps")
    if re.search(r"^\s*(COPY|ADD)\s.*\bmodels?\b", text, re.M | re.I):
        problems.append("model weights must be mounted, never copied into the image")
    if re.search(r"^\s*ADD\s+https?://", text, re.M):
        problems.append("no downloads with ADD")
    requirements = "gateway.txt" if stage == "gateway" else "gpu.txt"
    if f"requirements/{requirements}" not in text:
        problems.append(f"must install requirements/{requirements}")
    if stage == "gateway":
        instructions = "\n".join(f"{i} {a}" for stage_ in stages for i, a in stage_)
        if re.search(r"gpu\.txt|cpu\.txt|torch|cuda|nvidia", instructions, re.I):
            problems.append("the gateway image must have no torch and no CUDA")
        gateway_requirements = (ROOT / "requirements" / "gateway.txt").read_text()
        heavy = [
            line
            for line in gateway_requirements.splitlines()
            if re.match(r"\s*(torch|vllm|diffusers|transformers|nvidia-)", line, re.I)
        ]
        if heavy:
            problems.append(f"requirements/gateway.txt pulls GPU packages: {heavy}")
    if stage == "planner" and not re.search(r"pip install --no-deps[^\n]*/src", text):
        problems.append("the planner must pip install the project (vllm.general_plugins entry point)")
    return problems


def check_dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    if not path.exists():
        return [".dockerignore missing"]
    text = path.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    problems = []
    if not lines or lines[0] != "*":
        problems.append(".dockerignore should start with '*' (allow-list)")
    for needed in ("pyproject.toml", "requirements/", "protos/", "servekit/"):
        if f"!{needed}" not in lines:
            problems.append(f".dockerignore does not let {needed} in")
    return problems


def check_compose() -> list[str]:
    compose = load_yaml(DOCKER / "compose.yaml")
    services = compose.get("services", {})
    problems = []
    if set(services) != set(STAGES):
        return [f"services should be {STAGES}, found {sorted(services)}"]
    for name, service in services.items():
        build = service.get("build", {})
        if build.get("dockerfile") != f"docker/{name}.Dockerfile":
            problems.append(f"{name}: build.dockerfile should be docker/{name}.Dockerfile")
        image = service.get("image", "")
        if image.endswith(":latest") or ":" not in image:
            problems.append(f"{name}: image needs a pinned tag ({image})")
        test = service.get("healthcheck", {}).get("test", [])
        if "servekit.healthcheck" not in test:
            problems.append(f"{name}: healthcheck must use servekit.healthcheck")
        grace = str(service.get("stop_grace_period", "10s"))
        seconds = int(re.sub(r"s$", "", grace)) if re.fullmatch(r"\d+s", grace) else 0
        if seconds <= 30:
            problems.append(f"{name}: stop_grace_period ({grace}) must exceed --shutdown-grace-seconds 30")
    for name, gpu in (("planner", "0"), ("decoder", "1")):
        reservations = services[name].get("deploy", {}).get("resources", {}).get("reservations", {})
        devices = reservations.get("devices", [])
        if not devices or devices[0].get("device_ids") != [gpu]:
            problems.append(f"{name}: should reserve GPU {gpu}")
        mounts = [v for v in services[name].get("volumes", []) if ":/models/" in v]
        if not mounts or not all(v.endswith(":ro") for v in mounts):
            problems.append(f"{name}: weights must be mounted read-only under /models")
    if "deploy" in services["gateway"]:
        problems.append("gateway: must not reserve a GPU")
    depends = services["gateway"].get("depends_on", {})
    for stage in GPU_STAGES:
        if depends.get(stage, {}).get("condition") != "service_healthy":
            problems.append(f"gateway must depend on {stage} with condition service_healthy")
    command = services["gateway"].get("command", [])
    if "--planner=dns:///planner:50051" not in command or "--decoder=dns:///decoder:50052" not in command:
        problems.append("gateway must dial dns:///planner:50051 and dns:///decoder:50052")
    return problems


# ---------------------------------------------------------------------------------------------
# the chart: lint and schema


def check_lint(values: dict) -> list[str]:
    report = helm.lint(str(CHART), values or None, strict=True, namespace=NAMESPACE, kube_version="v1.27.0")
    messages = [m for m in report.get("messages", []) if m["severity"] >= 2]  # warnings and errors
    problems = [f"{m['path']}: {m['error'].strip()}" for m in messages]
    problems += [e.strip() for e in report.get("errors") or [] if e.strip() not in " ".join(problems)]
    return problems


def check_schema_documents() -> list[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    defaults = load_yaml(CHART / "values.yaml")
    for name, values in [("values.yaml", defaults)] + [(e.name, load_yaml(e)) for e in EXAMPLES]:
        for error in validator.iter_errors(deep_merge(defaults, values)):
            problems.append(f"{name}: {'/'.join(map(str, error.absolute_path))}: {error.message}")
    return problems


# Values the schema must reject (each would otherwise deploy something wrong).
SCHEMA_REJECTS = {
    "decoder.image.tag latest": {"decoder": {"image": {"tag": "latest"}}},
    "planner.image.tag latest": {"planner": {"image": {"tag": "latest"}}},
    "gateway.image.tag latest": {"gateway": {"image": {"tag": "latest"}}},
    "download image tag latest": {"model": {"download": {"image": {"repository": "x/hf", "tag": "latest"}}}},
    "malformed digest": {"decoder": {"image": {"digest": "sha256:1234"}}},
    "typo at top level": {"planer": {"replicas": 2}},
    "typo in a stage": {"decoder": {"replica": 2}},
    "negative replicas": {"gateway": {"replicas": -1}},
    "port out of range": {"planner": {"port": 70000}},
    "unknown pull policy": {"planner": {"image": {"pullPolicy": "Sometimes"}}},
    "probe period 0": {"decoder": {"probes": {"readiness": {"periodSeconds": 0}}}},
    "relative model path": {"model": {"path": "models/glm-image"}},
    "unknown engine": {"planner": {"engine": "tensorrt"}},
    "KEDA threshold not a number": {"decoder": {"autoscaling": {"threshold": "a lot"}}},
    "an API key in plaintext instead of its digest": {"gateway": {"apiKeys": {"entries": [{"sha256": "hunter2"}]}}},
    "an API key entry carrying the key": {
        "gateway": {"apiKeys": {"entries": [{"sha256": "a" * 64, "key": "hunter2"}]}}
    },
    "an uppercase API key digest": {"gateway": {"apiKeys": {"entries": [{"sha256": "A" * 64}]}}},
    "a negative per-key limit": {"gateway": {"apiKeys": {"requestsPerMinute": -1}}},
    "the removed http.apiKeySecret": {"gateway": {"http": {"apiKeySecret": {"name": "k", "key": "api-key"}}}},
    "stage TLS in a stage's block (it is tls.*)": {"planner": {"tls": {"enabled": True}}},
    "an unknown issuer kind": {"tls": {"certManager": {"issuerRef": {"kind": "VaultIssuer"}}}},
    "a certificate duration without a unit": {"tls": {"certManager": {"duration": "90"}}},
    "a NetworkPolicy peer that is no peer": {"networkPolicy": {"metricsFrom": [{"namespace": "monitoring"}]}},
    "an alert duration without a unit": {"alerts": {"queueGrowing": {"for": "15"}}},
    "an error ratio above 1": {"alerts": {"errorRatio": {"threshold": 5}}},
    "a latency target for no stage": {"alerts": {"latency": {"p95Seconds": {"vae": 10}}}},
    "status codes that are no regex of names": {"alerts": {"errorRatio": {"codes": "INTERNAL,UNAVAILABLE"}}},
}


def check_schema_rejects() -> list[str]:
    problems = []
    with helm.Chart.load(str(CHART)) as chart:
        for name, values in SCHEMA_REJECTS.items():
            try:
                chart.validate_schema(values)
            except helm.HelmError:
                continue
            problems.append(f"schema accepted {name}: {values}")
    return problems


# Values that pass the schema but must stop the render, with the message a user needs.
RENDER_REJECTS = {
    "termination grace <= preStop + shutdown grace": (
        {"decoder": {"terminationGracePeriodSeconds": 30, "shutdownGraceSeconds": 30}},
        "decoder.terminationGracePeriodSeconds",
    ),
    "planner GPUs != tensor parallel size": (
        {"planner": {"extraArgs": ["--tensor-parallel-size", "2"]}},
        "nvidia.com/gpu is 1 but",
    ),
    "no model storage": ({"model": {"download": {"enabled": False}}}, "model.existingClaim"),
    "model.path outside mountPath": ({"model": {"path": "/data/glm-image"}}, "model.path"),
    "TLS without a secret or cert-manager": ({"tls": {"enabled": True}}, "tls.planner.secretName is required"),
    "gateway TLS without a secret or cert-manager": (
        {"gateway": {"tls": {"enabled": True}}},
        "gateway.tls.secretName is required",
    ),
    "mutual TLS without TLS": ({"tls": {"mutual": True}}, "tls.mutual needs tls.enabled"),
    "mutual TLS without a client certificate": (
        {
            "tls": {
                "enabled": True,
                "mutual": True,
                "planner": {"secretName": "p"},
                "decoder": {"secretName": "d"},
            }
        },
        "tls.gatewayClient.secretName is required",
    ),
    "cert-manager without an issuer": (
        {"tls": {"enabled": True, "certManager": {"enabled": True}}},
        "tls.certManager.issuerRef.name is required",
    ),
    "API keys from a Secret and from entries": (
        {"gateway": {"apiKeys": {"existingSecret": "k", "entries": [{"sha256": "a" * 64}]}}},
        "existingSecret or entries, not both",
    ),
    "per-key limits without keys": ({"gateway": {"apiKeys": {"maxInFlight": 4}}}, "per API key"),
    "an API key digest listed twice": (
        {"gateway": {"apiKeys": {"entries": [{"sha256": "b" * 64}, {"sha256": "b" * 64, "name": "again"}]}}},
        "listed twice",
    ),
}


def check_render_rejects() -> list[str]:
    problems = []
    for name, (values, expected) in RENDER_REJECTS.items():
        error = render_error(values)
        if error is None:
            problems.append(f"rendered although {name}")
        elif expected not in error:
            problems.append(f"{name}: expected an error naming {expected!r}, got: {error.strip()}")
    return problems


# ---------------------------------------------------------------------------------------------
# the chart: rendered objects


def check_kubernetes_schemas(objects: list[Manifest]) -> list[str]:
    problems = []
    for obj in objects:
        if obj["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/", "cert-manager.io/")):
            continue  # CRDs: checked structurally in check_objects
        clean = {k: v for k, v in obj.items() if k != "_template"}
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(clean, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = "/".join(map(str, error.path))
                problems.append(f"{obj['_template']} (k8s {version}): {where}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{obj['_template']}: no Kubernetes {version} schema for {obj['kind']}")
    return problems


def check_objects(objects: list[Manifest], values: dict) -> list[str]:
    """The chart's rules, checked on the rendered objects."""
    problems: list[str] = []
    merged = values
    deployments = {component(d): d for d in of_kind(objects, "Deployment")}
    services = {component(s): s for s in of_kind(objects, "Service")}
    if set(deployments) != set(STAGES):
        return [f"expected one Deployment per stage, found components {sorted(map(str, deployments))}"]

    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        labels = obj["metadata"].get("labels", {})
        release_wide = obj["kind"] in RELEASE_WIDE
        if not release_wide and labels.get("app.kubernetes.io/component") not in STAGES:
            problems.append(f"{name}: no app.kubernetes.io/component label")
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"):
            if key not in labels:
                problems.append(f"{name}: no {key} label")
        expected_template = RELEASE_WIDE.get(obj["kind"], f"{obj['kind'].lower()}-{component(obj)}.yaml")
        if obj["_template"] != expected_template:
            problems.append(f"{name}: comes from {obj['_template']}, expected {expected_template}")

    for stage, deployment in deployments.items():
        spec = deployment["spec"]
        pod = spec["template"]
        selector = spec["selector"]["matchLabels"]
        if set(selector) != SELECTOR_KEYS or selector["app.kubernetes.io/component"] != stage:
            problems.append(f"{stage}: selector must be name, instance, component only: {selector}")
        if any(pod["metadata"]["labels"].get(k) != v for k, v in selector.items()):
            problems.append(f"{stage}: pod labels do not match the selector")
        if "helm.sh/chart" in pod["metadata"]["labels"]:
            problems.append(f"{stage}: no chart version on pod labels (a chart bump would restart every stage)")
        if spec["strategy"]["type"] != "RollingUpdate":
            problems.append(f"{stage}: strategy must be RollingUpdate")
        autoscaled = merged[stage]["autoscaling"]["enabled"]
        if autoscaled == ("replicas" in spec):
            problems.append(f"{stage}: replicas must be rendered exactly when autoscaling is off")
        pod_spec = pod["spec"]
        container = main_container(deployment)
        args = [str(a) for a in container.get("args", [])]
        image = container["image"]
        tag = image.split("@")[0].rsplit("/", 1)[-1].partition(":")[2]
        if pod["metadata"]["labels"].get("app.kubernetes.io/version") != tag:
            problems.append(f"{stage}: pod label app.kubernetes.io/version should be the image tag {tag}")
        if image.endswith(":latest") or re.search(r":latest@", image) or ":" not in image.split("/")[-1]:
            problems.append(f"{stage}: image {image} is not pinned")
        if container.get("command"):
            problems.append(f"{stage}: must keep the image's ENTRYPOINT (python -m ...), found a command")
        grace = int(arg_value(args, "--shutdown-grace-seconds") or 30)
        pre_stop = 0
        if "lifecycle" in container:
            pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        if pod_spec["terminationGracePeriodSeconds"] <= grace + pre_stop:
            problems.append(f"{stage}: terminationGracePeriodSeconds must exceed preStop + shutdown grace")
        if str(container["ports"][0]["containerPort"]) != arg_value(args, "--port"):
            problems.append(f"{stage}: container port and --port differ")
        # probes: readiness and liveness both present and distinct; a long startup probe on GPUs
        readiness, liveness = container.get("readinessProbe"), container.get("livenessProbe")
        if not readiness or not liveness:
            problems.append(f"{stage}: needs readiness and liveness probes")
        elif readiness == liveness:
            problems.append(f"{stage}: liveness and readiness probes must differ")
        tls = serves_tls(stage, merged)
        startup = container.get("startupProbe")
        for kind, probe in (("readiness", readiness), ("liveness", liveness), ("startup", startup)):
            if not probe:
                continue
            if tls and "exec" not in probe:
                problems.append(f"{stage}: {kind} probe must run the health client when serving TLS")
            if not tls and probe.get("grpc", {}).get("port") != container["ports"][0]["containerPort"]:
                problems.append(f"{stage}: {kind} probe must be a native gRPC probe on the gRPC port")
        if stage in GPU_STAGES:
            if not startup or startup["periodSeconds"] * startup["failureThreshold"] < 600:
                problems.append(f"{stage}: needs a startup probe allowing 10+ minutes of model loading")
        if (
            liveness
            and readiness
            and liveness["periodSeconds"] * liveness["failureThreshold"]
            <= (readiness["periodSeconds"] * readiness["failureThreshold"])
        ):
            problems.append(f"{stage}: liveness must be more patient than readiness")
        # GPUs and the model
        gpus = int((container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        if stage in GPU_STAGES:
            if gpus < 1:
                problems.append(f"{stage}: needs nvidia.com/gpu")
            model_mount = mounts.get("model")
            if not model_mount or not model_mount.get("readOnly"):
                problems.append(f"{stage}: the model must be mounted read-only")
            if arg_value(args, "--model") != merged["model"]["path"]:
                problems.append(f"{stage}: --model is not model.path")
        else:
            if gpus or "model" in mounts:
                problems.append("gateway: must use no GPU and no model")
        if stage == "planner":
            tp = int(arg_value(args, "--tensor-parallel-size") or 1)
            pp = int(arg_value(args, "--pipeline-parallel-size") or 1)
            if gpus != tp * pp:
                problems.append(f"planner: {gpus} GPUs for tensor x pipeline parallel size {tp * pp}")
        if merged["model"]["download"]["enabled"] and stage in GPU_STAGES:
            init = {c["name"]: c for c in pod_spec.get("initContainers", [])}.get("model-fetch")
            if not init or init.get("command") != ["hf"] or "download" not in init.get("args", []):
                problems.append(f"{stage}: model.download needs an `hf download` init container")
            elif any(e["name"] == "HF_TOKEN" and "value" in e for e in init.get("env", [])):
                problems.append(f"{stage}: the hub token must come from a Secret")

    # Services: planner and decoder headless; the gateway dials exactly them
    for stage in GPU_STAGES:
        service = services.get(stage)
        if not service or service["spec"].get("clusterIP") != "None":
            problems.append(f"{stage}: needs a headless Service")
            continue
        if service["spec"]["selector"] != deployments[stage]["spec"]["selector"]["matchLabels"]:
            problems.append(f"{stage}: headless Service selector differs from the Deployment's")
        fqdn = f"{service['metadata']['name']}.{NAMESPACE}.svc.{merged['clusterDomain']}"
        port = service["spec"]["ports"][0]["port"]
        gateway_args = [str(a) for a in main_container(deployments["gateway"])["args"]]
        expected = f"dns:///{fqdn}:{port}"
        if not merged["gateway"][f"{stage}Targets"] and arg_value(gateway_args, f"--{stage}") != expected:
            problems.append(f"gateway: --{stage} should be {expected}")
    gateway_service = services.get("gateway")
    if not gateway_service or gateway_service["spec"].get("clusterIP") == "None":
        problems.append("gateway: needs a (non-headless) Service")
    problems += check_gateway_http(main_container(deployments["gateway"]), gateway_service, merged["gateway"]["http"])

    # PDBs, autoscalers and monitors point at the right pods
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        stage = component(pdb)
        if pdb["spec"]["selector"]["matchLabels"] != deployments[stage]["spec"]["selector"]["matchLabels"]:
            problems.append(f"PDB {stage}: selector differs from the Deployment's")
    for stage in STAGES:
        rendered = any(component(p) == stage for p in of_kind(objects, "PodDisruptionBudget"))
        if merged[stage]["pdb"]["enabled"] != rendered:
            problems.append(f"{stage}: PodDisruptionBudget rendered iff pdb.enabled")
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    if merged["gateway"]["autoscaling"]["enabled"] != bool(hpas):
        problems.append("gateway: HPA rendered iff gateway.autoscaling.enabled")
    for hpa in hpas:
        if hpa["spec"]["scaleTargetRef"]["name"] != deployments["gateway"]["metadata"]["name"]:
            problems.append("HPA does not target the gateway Deployment")
    scaled = {component(s): s for s in of_kind(objects, "ScaledObject")}
    for stage in GPU_STAGES:
        if merged[stage]["autoscaling"]["enabled"] != (stage in scaled):
            problems.append(f"{stage}: ScaledObject rendered iff autoscaling.enabled")
        if stage in scaled:
            spec = scaled[stage]["spec"]
            if spec["scaleTargetRef"]["name"] != deployments[stage]["metadata"]["name"]:
                problems.append(f"{stage}: ScaledObject targets {spec['scaleTargetRef']['name']}")
            trigger = spec["triggers"][0]
            query = trigger["metadata"]["query"]
            if trigger["type"] != "prometheus" or (
                not merged[stage]["autoscaling"]["query"]
                and not all(
                    s in query
                    for s in ("glmimage_requests_", "glmimage_gateway_stage_waiting", f'stage="{stage}"', NAMESPACE)
                )
            ):
                problems.append(
                    f"{stage}: ScaledObject must query the stage's glmimage_requests_* gauges and the requests "
                    "waiting for it at the gateways (glmimage_gateway_stage_waiting)"
                )
    for kind in ("PodMonitor", "ServiceMonitor"):
        for monitor in of_kind(objects, kind):
            stage = component(monitor)
            selector = deployments[stage]["spec"]["selector"]["matchLabels"]
            if monitor["spec"]["selector"]["matchLabels"] != selector:
                problems.append(f"{kind} {stage}: selector differs from the stage's selector")
            endpoints = monitor["spec"].get("podMetricsEndpoints") or monitor["spec"].get("endpoints")
            if endpoints[0]["port"] != "metrics":
                problems.append(f"{kind} {stage}: must scrape the metrics port")
        for stage in STAGES:
            key = kind[0].lower() + kind[1:]
            rendered = any(component(m) == stage for m in of_kind(objects, kind))
            if merged[stage]["metrics"][key]["enabled"] != rendered:
                problems.append(f"{stage}: {kind} rendered iff metrics.{key}.enabled")
    for stage in STAGES:
        if merged[stage]["metrics"]["serviceMonitor"]["enabled"]:
            ports = [p["name"] for p in services[stage]["spec"]["ports"]]
            if "metrics" not in ports:
                problems.append(f"{stage}: its Service needs a metrics port for the ServiceMonitor")
    return problems


def check_gateway_http(container: Manifest, service: Manifest | None, http: dict) -> list[str]:
    """The HTTP API: --http-port on the container's `http` port and on the Service iff enabled."""
    args = [str(a) for a in container.get("args", [])]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["name"]: p for p in (service or {}).get("spec", {}).get("ports", [])}
    if not http["enabled"]:
        if arg_value(args, "--http-port") is not None or "http" in ports or "http" in service_ports:
            return ["gateway: HTTP API disabled but rendered (--http-port, an http port)"]
        return []
    problems = []
    if arg_value(args, "--http-port") != str(ports.get("http")):
        problems.append("gateway: --http-port and the container's http port differ")
    if service_ports.get("http", {}).get("targetPort") != "http":
        problems.append("gateway: its Service needs an http port targeting the container's")
    return problems


# ---------------------------------------------------------------------------------------------
# the chart: security (TLS and mutual TLS, API keys, NetworkPolicies, pod hardening)


def serves_tls(stage: str, values: dict) -> bool:
    """planner and decoder serve TLS with `tls.enabled`; the gateway's listener with `gateway.tls.enabled`."""
    return bool(values["gateway"]["tls"]["enabled"] if stage == "gateway" else values["tls"]["enabled"])


def service_names(service: str, values: dict) -> list[str]:
    """The names a certificate for a Service must carry: <svc>, <svc>.<ns>, <svc>.<ns>.svc, and the FQDN."""
    return [
        service,
        f"{service}.{NAMESPACE}",
        f"{service}.{NAMESPACE}.svc",
        f"{service}.{NAMESPACE}.svc.{values['clusterDomain']}",
    ]


def secret_file(pod_spec: Manifest, container: Manifest, path: str | None) -> tuple[str | None, str | None, list[str]]:
    """(Secret, key in it, problems) of the file `path` in `container`: it must lie on a read-only Secret
    volume mounted as a directory (a subPath mount never sees a rotated Secret)."""
    if not path:
        return None, None, ["no file given"]
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return None, None, [f"{path} is on no mounted volume"]
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    problems = []
    if "subPath" in mount or "subPathExpr" in mount:
        problems.append(f"{path}: volume {mount['name']} is mounted with subPath (rotation never reaches it)")
    if not mount.get("readOnly"):
        problems.append(f"{path}: volume {mount['name']} is not mounted read-only")
    volume = {v["name"]: v for v in pod_spec.get("volumes", [])}.get(mount["name"], {})
    secret = volume.get("secret")
    if not secret:
        return None, None, problems + [f"{path}: volume {mount['name']} is not a Secret"]
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    key: str | None = relative
    if secret.get("items"):
        key = {item["path"]: item["key"] for item in secret["items"]}.get(relative)
        if key is None:
            problems.append(f"{path}: not among the items of Secret {secret['secretName']}")
    return secret["secretName"], key, problems


def target_host(target: str | None) -> str:
    """The host of a gRPC target such as dns:///name:port."""
    return re.sub(r"^[a-z]+:///?", "", target or "").rsplit(":", 1)[0]


def check_certificate(
    cert: Manifest, values: dict, names: list[str], usages: set[str], no_usages: set[str]
) -> list[str]:
    spec, name = cert["spec"], f"Certificate/{cert['metadata']['name']}"
    manager = values["tls"]["certManager"]
    problems = []
    missing = [n for n in names if n not in spec.get("dnsNames", [])]
    if missing:
        problems.append(f"{name}: dnsNames lack {missing}")
    if not usages <= set(spec.get("usages", [])) or set(spec.get("usages", [])) & no_usages:
        problems.append(
            f"{name}: usages {spec.get('usages')} should include {sorted(usages)} and not {sorted(no_usages)}"
        )
    issuer = {k: manager["issuerRef"][k] for k in ("name", "kind", "group")}
    if spec.get("issuerRef") != issuer:
        problems.append(f"{name}: issuerRef {spec.get('issuerRef')} is not tls.certManager.issuerRef {issuer}")
    if (spec.get("duration"), spec.get("renewBefore")) != (manager["duration"], manager["renewBefore"]):
        problems.append(f"{name}: duration/renewBefore differ from tls.certManager")
    if spec.get("privateKey", {}).get("rotationPolicy") != "Always":
        problems.append(f"{name}: privateKey.rotationPolicy must be Always (a new key on every renewal)")
    return problems


def check_tls(objects: list[Manifest], values: dict) -> list[str]:
    """TLS to the stages, mutual TLS and the gateway's listener: the flags of every stage, the Secrets they
    read (directory mounts), the probes, and the cert-manager Certificates with their names and usages."""
    problems: list[str] = []
    tls, manager = values["tls"], values["tls"]["certManager"]
    mutual = tls["enabled"] and tls["mutual"]
    deployments = {component(d): d for d in of_kind(objects, "Deployment")}
    services = {component(s): s for s in of_kind(objects, "Service")}
    certificates = {c["spec"]["secretName"]: c for c in of_kind(objects, "Certificate")}
    if len(certificates) != len(of_kind(objects, "Certificate")):
        problems.append("two Certificates write the same Secret")
    expected_certificates: set[str] = set()
    serving_secret: dict[str, str | None] = {}
    gateway_args = [str(a) for a in main_container(deployments["gateway"]).get("args", [])]
    for stage in STAGES:
        pod_spec = deployments[stage]["spec"]["template"]["spec"]
        container = main_container(deployments[stage])
        args = [str(a) for a in container.get("args", [])]
        service = services[stage]["metadata"]["name"]
        names = service_names(service, values)
        cert_file, key_file = arg_value(args, "--tls-cert-file"), arg_value(args, "--tls-key-file")
        if not serves_tls(stage, values):
            if cert_file or key_file:
                problems.append(f"{stage}: TLS is off but --tls-cert-file/--tls-key-file are set")
            serving_secret[stage] = None
        else:
            secret, key, found = secret_file(pod_spec, container, cert_file)
            problems += [f"{stage}: --tls-cert-file: {p}" for p in found]
            key_secret, key_key, found = secret_file(pod_spec, container, key_file)
            problems += [f"{stage}: --tls-key-file: {p}" for p in found]
            if (key, key_key) != ("tls.crt", "tls.key") or key_secret != secret:
                problems.append(f"{stage}: certificate and key must be tls.crt and tls.key of one Secret")
            serving_secret[stage] = secret
            existing = values["gateway"]["tls"]["secretName"] if stage == "gateway" else tls[stage]["secretName"]
            if existing and secret != existing:
                problems.append(f"{stage}: serves the certificate of Secret {secret}, not {existing}")
            if not existing:
                expected_certificates.add(str(secret))
                cert = certificates.get(str(secret))
                if cert is None:
                    problems.append(f"{stage}: no cert-manager Certificate writes its Secret {secret}")
                elif component(cert) != stage:
                    problems.append(f"{stage}: its Certificate is labelled {component(cert)}")
                else:
                    extra = manager["gatewayDNSNames"] if stage == "gateway" else []
                    usages = {"server auth"} | ({"client auth"} if mutual and stage != "gateway" else set())
                    no_usages = set() if mutual and stage != "gateway" else {"client auth"}
                    problems += check_certificate(cert, values, names + extra, usages, no_usages)
            # probes: the health client over TLS, checking the Service's name, with a client certificate under mTLS
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = [str(a) for a in container.get(kind, {}).get("exec", {}).get("command", [])]
                if not command:
                    continue  # check_objects requires exec probes under TLS
                if "servekit.healthcheck" not in command:
                    problems.append(f"{stage}: {kind} must run servekit.healthcheck")
                if arg_value(command, "--tls-server-name") != names[-1]:
                    problems.append(f"{stage}: {kind} --tls-server-name should be {names[-1]}")
                ca_secret, _, found = secret_file(pod_spec, container, arg_value(command, "--tls-ca-file"))
                problems += [f"{stage}: {kind} --tls-ca-file: {p}" for p in found]
                probe_cert = (arg_value(command, "--tls-cert-file"), arg_value(command, "--tls-key-file"))
                if mutual and stage != "gateway":
                    if probe_cert != (cert_file, key_file):
                        problems.append(f"{stage}: {kind} must present the pod's certificate (mutual TLS)")
                elif any(probe_cert):
                    problems.append(f"{stage}: {kind} presents a client certificate without mutual TLS")
        # client certificates: required by planner and decoder under mTLS, checked against the CA
        if stage != "gateway":
            client_ca = arg_value(args, "--tls-client-ca-file")
            if not mutual:
                if client_ca:
                    problems.append(f"{stage}: --tls-client-ca-file without tls.mutual")
                continue
            secret, key, found = secret_file(pod_spec, container, client_ca)
            problems += [f"{stage}: --tls-client-ca-file: {p}" for p in found]
            want = (
                (tls["ca"]["secretName"], tls["ca"]["key"])
                if tls["ca"]["secretName"]
                else (serving_secret[stage], "ca.crt")
            )
            if (secret, key) != want:
                problems.append(f"{stage}: --tls-client-ca-file reads {secret}/{key}, expected {want[0]}/{want[1]}")
            # the gateway dials the name this certificate carries
            dialed = target_host(arg_value(gateway_args, f"--{stage}"))
            if not values["gateway"][f"{stage}Targets"] and dialed != names[-1]:
                problems.append(f"gateway: dials {dialed}, but {stage}'s certificate names {names[-1]}")
    # the gateway as the stages' client
    pod_spec = deployments["gateway"]["spec"]["template"]["spec"]
    container = main_container(deployments["gateway"])
    stage_ca = arg_value(gateway_args, "--stage-tls-ca-file")
    client = (arg_value(gateway_args, "--stage-tls-cert-file"), arg_value(gateway_args, "--stage-tls-key-file"))
    client_secret = None
    if not tls["enabled"]:
        if stage_ca:
            problems.append("gateway: --stage-tls-ca-file while tls.enabled is off")
    else:
        secret, key, found = secret_file(pod_spec, container, stage_ca)
        problems += [f"gateway: --stage-tls-ca-file: {p}" for p in found]
        if tls["ca"]["secretName"] and (secret, key) != (tls["ca"]["secretName"], tls["ca"]["key"]):
            problems.append(f"gateway: --stage-tls-ca-file reads {secret}/{key}, not tls.ca")
        if not tls["ca"]["secretName"] and key != "ca.crt":
            problems.append("gateway: --stage-tls-ca-file must be the ca.crt of a certificate Secret")
    if not mutual:
        if any(client):
            problems.append("gateway: --stage-tls-cert-file/--stage-tls-key-file without tls.mutual")
    else:
        secret, key, found = secret_file(pod_spec, container, client[0])
        client_secret = secret
        problems += [f"gateway: --stage-tls-cert-file: {p}" for p in found]
        key_secret, key_key, found = secret_file(pod_spec, container, client[1])
        problems += [f"gateway: --stage-tls-key-file: {p}" for p in found]
        if (key, key_key) != ("tls.crt", "tls.key") or key_secret != secret:
            problems.append("gateway: client certificate and key must be tls.crt and tls.key of one Secret")
        existing = tls["gatewayClient"]["secretName"]
        if existing and secret != existing:
            problems.append(f"gateway: presents Secret {secret}, not tls.gatewayClient.secretName {existing}")
        if not existing:
            expected_certificates.add(str(secret))
            cert = certificates.get(str(secret))
            if cert is None or component(cert) != "gateway":
                problems.append(f"gateway: no cert-manager Certificate (gateway) writes its client Secret {secret}")
            else:
                problems += check_certificate(cert, values, [], {"client auth"}, {"server auth"})
        for stage in GPU_STAGES:
            if serving_secret[stage] == secret:
                problems.append(f"gateway: its client certificate is {stage}'s serving certificate")
    # private keys stay in their own pods
    for stage in STAGES:
        pod_spec = deployments[stage]["spec"]["template"]["spec"]
        for volume in pod_spec.get("volumes", []):
            secret = volume.get("secret")
            if not secret:
                continue
            others = {s for o, s in serving_secret.items() if o != stage and s}
            if secret["secretName"] in others and {i["key"] for i in secret.get("items", [])} != {"ca.crt"}:
                problems.append(f"{stage}: mounts another stage's Secret {secret['secretName']} beyond its ca.crt")
            if stage != "gateway" and client_secret and secret["secretName"] == client_secret:
                problems.append(f"{stage}: mounts the gateway's client certificate")
    # Certificates: exactly the ones needed, and only with tls.certManager.enabled
    if not manager["enabled"]:
        expected_certificates = set()
    if set(certificates) != expected_certificates:
        problems.append(f"Certificates write {sorted(certificates)}, expected {sorted(expected_certificates)}")
    return problems


API_KEY_LINE = re.compile(r"sha256:[0-9a-f]{64}(\s+[^#\s][^#]*)?")


def check_api_keys(objects: list[Manifest], values: dict) -> list[str]:
    """API keys: --api-keys-file on a directory-mounted Secret iff keys are set; the chart's Secret holds
    digests only; per-key limits passed; the removed --http-api-key-file never rendered."""
    problems: list[str] = []
    keys = values["gateway"]["apiKeys"]
    deployments = {component(d): d for d in of_kind(objects, "Deployment")}
    for stage, deployment in deployments.items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if any(str(a).startswith("--http-api-key-file") for a in container.get("args", [])):
                problems.append(f"{stage}: --http-api-key-file is gone (gateway.apiKeys: --api-keys-file)")
    pod_spec = deployments["gateway"]["spec"]["template"]["spec"]
    container = main_container(deployments["gateway"])
    args = [str(a) for a in container.get("args", [])]
    key_file = arg_value(args, "--api-keys-file")
    chart_secrets = [s for s in of_kind(objects, "Secret") if s["_template"] == "secret-gateway.yaml"]
    limits = {"--key-requests-per-minute": keys["requestsPerMinute"], "--key-max-in-flight": keys["maxInFlight"]}
    if not (keys["existingSecret"] or keys["entries"]):
        if key_file or chart_secrets or any(arg_value(args, flag) for flag in limits):
            problems.append("gateway: no gateway.apiKeys, yet an API keys file, Secret or limit is rendered")
        return problems
    for flag, limit in limits.items():
        if arg_value(args, flag) != (str(limit) if limit else None):
            problems.append(f"gateway: {flag} should be {limit or 'absent'}")
    secret, key, found = secret_file(pod_spec, container, key_file)
    problems += [f"gateway: --api-keys-file: {p}" for p in found]
    if key != keys["secretKey"]:
        problems.append(f"gateway: --api-keys-file reads key {key}, not gateway.apiKeys.secretKey")
    if keys["existingSecret"]:
        if chart_secrets:
            problems.append("gateway.apiKeys.existingSecret is set, yet the chart renders its own keys Secret")
        if secret != keys["existingSecret"]:
            problems.append(f"gateway: --api-keys-file reads Secret {secret}, not {keys['existingSecret']}")
    else:
        if len(chart_secrets) != 1:
            return problems + ["gateway.apiKeys.entries: expected one chart-made Secret"]
        made = chart_secrets[0]
        if secret != made["metadata"]["name"]:
            problems.append(
                f"gateway: --api-keys-file reads Secret {secret}, not the chart's {made['metadata']['name']}"
            )
        data = made.get("stringData", {})
        if set(data) != {keys["secretKey"]} or "data" in made:
            problems.append(f"Secret {made['metadata']['name']}: should hold only stringData.{keys['secretKey']}")
        lines = [line.split("#", 1)[0].strip() for line in str(data.get(keys["secretKey"], "")).splitlines()]
        lines = [line for line in lines if line]
        bad = [line for line in lines if not API_KEY_LINE.fullmatch(line)]
        if bad:
            problems.append(f"Secret {made['metadata']['name']}: lines other than 'sha256:<digest> [name]': {bad}")
        digests = [line.split()[0].removeprefix("sha256:") for line in lines]
        if digests != [entry["sha256"] for entry in keys["entries"]]:
            problems.append(f"Secret {made['metadata']['name']}: digests differ from gateway.apiKeys.entries")
    for stage in GPU_STAGES:
        volumes = deployments[stage]["spec"]["template"]["spec"].get("volumes", [])
        if any(v.get("secret", {}).get("secretName") == secret for v in volumes):
            problems.append(f"{stage}: mounts the gateway's API keys")
    return problems


def check_network_policies(objects: list[Manifest], values: dict) -> list[str]:
    """One ingress NetworkPolicy per stage: planner and decoder gRPC from this release's gateway pods (and
    networkPolicy.stageFrom) only, the gateway's gRPC/HTTP from networkPolicy.gatewayFrom, metrics from
    networkPolicy.metricsFrom only; no rule opens a port the stage does not serve."""
    policy = values["networkPolicy"]
    policies = of_kind(objects, "NetworkPolicy")
    if not policy["enabled"]:
        return ["NetworkPolicies rendered although networkPolicy.enabled is off"] if policies else []
    problems: list[str] = []
    deployments = {component(d): d for d in of_kind(objects, "Deployment")}
    by_stage = {component(p): p for p in policies}
    if len(policies) != len(STAGES) or set(by_stage) != set(STAGES):
        return [f"expected one NetworkPolicy per stage, found {sorted(map(str, by_stage))}"]
    gateway_peer = {"podSelector": {"matchLabels": deployments["gateway"]["spec"]["selector"]["matchLabels"]}}
    for stage, netpol in by_stage.items():
        spec = netpol["spec"]
        selector = deployments[stage]["spec"]["selector"]["matchLabels"]
        if spec.get("podSelector", {}).get("matchLabels") != selector or spec["podSelector"].get("matchExpressions"):
            problems.append(f"NetworkPolicy {stage}: podSelector is not the stage's selector")
        if spec.get("policyTypes") != ["Ingress"]:
            problems.append(f"NetworkPolicy {stage}: policyTypes should be [Ingress] (egress stays open)")
        ports = {p["name"]: p["containerPort"] for p in main_container(deployments[stage])["ports"]}
        allowed: dict[int, list[Any]] = {}
        for rule in spec.get("ingress", []):
            if not rule.get("ports"):
                problems.append(f"NetworkPolicy {stage}: a rule without ports opens every port")
                continue
            for port in rule["ports"]:
                if port.get("protocol", "TCP") != "TCP" or port["port"] not in ports.values() or "endPort" in port:
                    problems.append(f"NetworkPolicy {stage}: opens {port}, not a port of the stage")
                allowed.setdefault(port["port"], []).append(rule.get("from"))
        expected: dict[int, list[Any]] = {ports["metrics"]: [policy["metricsFrom"] or None]}
        if stage == "gateway":
            for name in ("grpc", "http"):
                if name in ports:
                    expected[ports[name]] = [policy["gatewayFrom"] or None]
        else:
            expected[ports["grpc"]] = [[gateway_peer, *policy["stageFrom"]]]
        if allowed != expected:
            problems.append(f"NetworkPolicy {stage}: allows {allowed}, expected {expected}")
        if stage != "gateway" and any(f is None for f in allowed.get(ports["grpc"], [])):
            problems.append(f"NetworkPolicy {stage}: its gRPC port is open to anyone")
    return problems


def check_pod_security(objects: list[Manifest], values: dict) -> list[str]:
    """Every container of every stage: non-root, read-only root filesystem, no privilege escalation, all
    capabilities dropped, seccomp RuntimeDefault; no host namespaces; no service-account token."""
    problems: list[str] = []
    for deployment in of_kind(objects, "Deployment"):
        stage = component(deployment)
        pod = deployment["spec"]["template"]["spec"]
        pod_context = pod.get("securityContext") or {}
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{stage}: automountServiceAccountToken must be false (the services never call the API)")
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(key):
                problems.append(f"{stage}: {key} must be off")
        if pod_context.get("runAsUser") == 0 or pod_context.get("runAsGroup") == 0:
            problems.append(f"{stage}: pod runs as root")
        for container in pod.get("initContainers", []) + pod["containers"]:
            name = f"{stage}/{container['name']}"
            context = container.get("securityContext") or {}
            if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
                problems.append(f"{name}: runAsNonRoot must be true")
            if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
                problems.append(f"{name}: runs as root")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: readOnlyRootFilesystem must be true")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation must be false")
            if context.get("privileged"):
                problems.append(f"{name}: must not be privileged")
            capabilities = context.get("capabilities") or {}
            if "ALL" not in (capabilities.get("drop") or []) or capabilities.get("add"):
                problems.append(f"{name}: must drop ALL capabilities and add none")
            seccomp = context.get("seccompProfile") or pod_context.get("seccompProfile") or {}
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{name}: seccompProfile must be RuntimeDefault")
    for account in of_kind(objects, "ServiceAccount"):
        if account.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount/{account['metadata']['name']}: automountServiceAccountToken must be false")
    if values["serviceAccount"]["create"] and not of_kind(objects, "ServiceAccount"):
        problems.append("serviceAccount.create is on but no ServiceAccount is rendered")
    return problems


# ---------------------------------------------------------------------------------------------
# monitoring: the dashboard, the alerts, and every PromQL query the chart holds


def check_monitoring(objects: list[Manifest], values: dict) -> list[str]:
    """The dashboard ConfigMap and the PrometheusRule: rendered iff enabled, labelled as configured."""
    problems = []
    dashboards = of_kind(objects, "ConfigMap")
    if values["dashboards"]["enabled"] != bool(dashboards):
        problems.append("dashboard ConfigMap rendered iff dashboards.enabled")
    for config_map in dashboards:
        if not values["dashboards"]["labels"].items() <= config_map["metadata"]["labels"].items():
            problems.append("the dashboard ConfigMap lacks dashboards.labels (the Grafana sidecar's)")
        for key, text in config_map["data"].items():
            panels = json.loads(text)["panels"]
            if not key.endswith(".json") or not panels:
                problems.append(f"dashboard ConfigMap: {key} is no dashboard with panels")
    rules = of_kind(objects, "PrometheusRule")
    if values["alerts"]["enabled"] != bool(rules):
        problems.append("PrometheusRule rendered iff alerts.enabled")
    for rule in rules:
        if not values["alerts"]["labels"].items() <= rule["metadata"]["labels"].items():
            problems.append("the PrometheusRule lacks alerts.labels")
        alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
        if {a["alert"] for a in alerts} != ALERTS:
            problems.append(f"PrometheusRule: alerts {sorted({a['alert'] for a in alerts})}, expected {sorted(ALERTS)}")
        for alert in alerts:
            if not alert.get("for") or alert.get("labels", {}).get("severity") not in ("warning", "critical"):
                problems.append(f"alert {alert['alert']}: needs a `for` and a severity")
    return problems


@functools.cache
def exported_metrics() -> frozenset[str]:
    """The names of the samples the services export (scripts/metric_names.py, in the project's .venv)."""
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        raise RuntimeError("no .venv: run `make stubs` first (the services' metrics are read from it)")
    run = subprocess.run([str(python), str(ROOT / "scripts" / "metric_names.py")], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"scripts/metric_names.py failed: {run.stderr.strip()}")
    return frozenset(run.stdout.split())


def promql_queries(objects: list[Manifest]) -> Iterator[tuple[str, str]]:
    """(where, query) of every PromQL query in the rendered chart: KEDA triggers, alert rules, the
    dashboard's panels and its `label_values(<selector>, <label>)` variables. Grafana's
    $__rate_interval becomes 5m; other Grafana variables only stand in label values."""
    for scaled in of_kind(objects, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            yield f"ScaledObject/{scaled['metadata']['name']}", trigger["metadata"]["query"]
    for rule in of_kind(objects, "PrometheusRule"):
        for group in rule["spec"]["groups"]:
            for alert in group["rules"]:
                yield f"alert {alert['alert']}", alert["expr"]
    for config_map in of_kind(objects, "ConfigMap"):
        for key, text in config_map["data"].items():
            dashboard = json.loads(text)
            panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
            for panel in panels:
                for target in panel.get("targets", []):
                    yield f"{key} panel {panel['title']!r}", target["expr"].replace("$__rate_interval", "5m")
            for variable in dashboard["templating"]["list"]:
                if variable["type"] == "query":
                    selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"])
                    yield f"{key} variable {variable['name']}", selector[1] if selector else variable["query"]


def name_alternatives(regex: str) -> list[str] | None:
    """The names a regex of literal alternatives matches (`a|b`, `x_(c|d)`); None for any other regex."""

    def alternatives(at: int) -> tuple[list[str], int]:
        options, current = [], [""]
        while at < len(regex) and regex[at] != ")":
            char = regex[at]
            if char == "|":
                options, current = options + current, [""]
            elif char == "(":
                inner, at = alternatives(at + 1)
                if at == len(regex):
                    raise ValueError("unclosed group")
                current = [head + tail for head in current for tail in inner]
            elif char.isalnum() or char in "_:":
                current = [head + char for head in current]
            else:
                raise ValueError(f"not a literal: {char}")
            at += 1
        return options + current, at

    try:
        names, end = alternatives(0)
    except ValueError:
        return None
    return names if end == len(regex) else None


def selected_names(expr) -> tuple[set[str], set[str]]:
    """The metric names an expression's selectors name, and the `__name__` regexes that list no names."""
    names: set[str] = set()
    patterns: set[str] = set()

    def visit(node) -> None:
        if not isinstance(node, promql_parser.VectorSelector):
            return
        if node.name:
            names.add(node.name)
        for matcher in node.matchers.matchers:
            if matcher.name != "__name__":
                continue
            listed = [matcher.value] if matcher.op == promql_parser.MatchOp.Equal else None
            if matcher.op == promql_parser.MatchOp.Re:
                listed = name_alternatives(matcher.value)
            if listed is None:
                patterns.add(matcher.value)
            else:
                names.update(listed)

    promql_parser.walk(expr, visit)
    return names, patterns


def check_promql(objects: list[Manifest]) -> list[str]:
    """Every query parses as PromQL and names only metrics the services (or kube-state-metrics) export."""
    problems = []
    known = exported_metrics() | KUBE_STATE_METRICS
    for where, query in promql_queries(objects):
        try:
            expr = promql_parser.parse(query)
        except ValueError as error:
            problems.append(f"{where}: not PromQL ({error}): {query}")
            continue
        names, patterns = selected_names(expr)
        for name in sorted(names - known):
            problems.append(f"{where}: no service exports {name}")
        for pattern in sorted(patterns):
            if not any(re.fullmatch(pattern, name) for name in known):
                problems.append(f"{where}: __name__=~{pattern!r} matches no exported metric")
    return problems


# ---------------------------------------------------------------------------------------------
# upgrades


def strip_volatile(obj: Manifest) -> Manifest:
    return {k: v for k, v in obj.items() if k != "_template"}


def check_stage_isolation(base_values: dict) -> list[str]:
    """Bumping one stage's image tag changes that stage's objects and nothing else."""
    problems = []
    before = {(o["kind"], o["metadata"]["name"]): strip_volatile(o) for o in render(base_values)}
    for stage in STAGES:
        bumped = deep_merge(base_values, {stage: {"image": {"tag": "9.9.9-upgrade"}}})
        after = {(o["kind"], o["metadata"]["name"]): strip_volatile(o) for o in render(bumped)}
        if set(before) != set(after):
            problems.append(f"{stage}.image.tag changed the set of objects")
            continue
        changed = [key for key in before if before[key] != after[key]]
        foreign = [key for key in changed if component(before[key]) != stage]
        if foreign:
            problems.append(f"{stage}.image.tag also changed {foreign}")
        deployment = [k for k in changed if k[0] == "Deployment"]
        if len(deployment) != 1:
            problems.append(f"{stage}.image.tag did not change the {stage} Deployment")
            continue
        template_before = before[deployment[0]]["spec"]["template"]
        template_after = after[deployment[0]]["spec"]["template"]
        if main_container({"spec": {"template": template_after}})["image"].find("9.9.9-upgrade") < 0:
            problems.append(f"{stage}: the new tag is not in the pod's image")
        if template_after["metadata"]["labels"].get("app.kubernetes.io/version") != "9.9.9-upgrade":
            problems.append(f"{stage}: the pods' app.kubernetes.io/version label does not follow the tag")
        if template_before == template_after:
            problems.append(f"{stage}: the pod template did not change")
    return problems


# ---------------------------------------------------------------------------------------------
# the chart README's values table, generated from the `# --` comments of values.yaml


def values_rows() -> list[tuple[str, str, str, str]]:
    values = load_yaml(CHART / "values.yaml")
    rows = []
    stack: list[tuple[int, str]] = []
    description: str | None = None
    for line in (CHART / "values.yaml").read_text().splitlines():
        comment = re.match(r"^\s*# -- (.*)$", line)
        if comment:
            description = comment.group(1).strip()
            continue
        key_line = re.match(r"^(\s*)([A-Za-z0-9_./-]+):(\s|$)", line)
        if not key_line:
            if not line.strip().startswith("#") and line.strip() and not line.strip().startswith("-"):
                description = None
            continue
        indent, key = len(key_line.group(1)), key_line.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if description is None:
            continue
        path = [k for _, k in stack]
        node: Any = values
        for part in path:
            node = node[part]
        kind = {dict: "object", list: "list", bool: "bool", int: "int", float: "float", str: "string"}.get(
            type(node), "string"
        )
        rows.append((".".join(path), kind, json.dumps(node, separators=(",", ":")), description))
        description = None
    return rows


def values_table() -> str:
    lines = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for key, kind, default, description in values_rows():
        default = default.replace("|", "\\|")
        description = description.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | `{default}` | {description} |")
    return "\n".join(lines)


def readme_with_table() -> str:
    readme = (CHART / "README.md").read_text()
    start, end = readme.index(README_START), readme.index(README_END)
    return readme[: start + len(README_START)] + "\n" + values_table() + "\n" + readme[end:]


def check_readme() -> list[str]:
    if readme_with_table() != (CHART / "README.md").read_text():
        return ["the values table is stale: run `python scripts/check_chart.py --write-readme`"]
    return []


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-readme", action="store_true", help="regenerate the README's values table")
    options = parser.parse_args()
    if options.write_readme:
        (CHART / "README.md").write_text(readme_with_table())
        print(f"wrote the values table of {CHART.relative_to(ROOT)}/README.md")
        return 0

    report = Report()
    for stage in STAGES:
        report.run(
            f"docker/{stage}.Dockerfile: multi-stage, deps first, non-root, exec ENTRYPOINT, HEALTHCHECK",
            lambda stage=stage: check_dockerfile(stage),
        )
    report.run(".dockerignore: allow-list", check_dockerignore)
    report.run("docker/compose.yaml: GPUs 0/1, read-only weights, healthchecks, healthy deps", check_compose)

    defaults = load_yaml(CHART / "values.yaml")
    report.run("helm lint --strict (default values)", lambda: check_lint({}))
    for example in EXAMPLES:
        report.run(f"helm lint --strict -f examples/{example.name}", lambda e=example: check_lint(load_yaml(e)))
    report.run("values.schema.json: valid draft-07; values.yaml and examples conform", check_schema_documents)
    report.run(
        f"values.schema.json rejects {len(SCHEMA_REJECTS)} bad value sets (tag latest, typos...)",
        check_schema_rejects,
    )
    report.run(
        f"render refuses {len(RENDER_REJECTS)} inconsistent value sets (grace, GPUs, storage, TLS)",
        check_render_rejects,
    )
    for name, values in scenarios():
        merged = deep_merge(defaults, values)
        try:
            objects = render(values)
        except helm.HelmError as error:
            report.check(f"[{name}] helm template", [str(error).strip()])
            continue
        report.check(f"[{name}] helm template", [])
        versions = " and ".join(KUBE_VERSIONS)
        report.run(
            f"[{name}] Kubernetes {versions} API schemas (strict)",
            lambda objects=objects: check_kubernetes_schemas(objects),
        )
        report.run(
            f"[{name}] labels, selectors, probes, GPUs, services, autoscaling, monitors",
            lambda objects=objects, merged=merged: check_objects(objects, merged),
        )
        report.run(
            f"[{name}] TLS/mTLS: flags, Secrets mounted as directories, probes, cert-manager Certificates",
            lambda objects=objects, merged=merged: check_tls(objects, merged),
        )
        report.run(
            f"[{name}] API keys: digests-only Secret, mounted as a directory, per-key limits",
            lambda objects=objects, merged=merged: check_api_keys(objects, merged),
        )
        report.run(
            f"[{name}] NetworkPolicies: stages reachable from the gateway only, metrics from the scraper",
            lambda objects=objects, merged=merged: check_network_policies(objects, merged),
        )
        report.run(
            f"[{name}] pods locked down: non-root, read-only root, no capabilities, seccomp, no token",
            lambda objects=objects, merged=merged: check_pod_security(objects, merged),
        )
        report.run(
            f"[{name}] dashboard ConfigMap and PrometheusRule: rendered iff enabled, labels, every alert",
            lambda objects=objects, merged=merged: check_monitoring(objects, merged),
        )
        report.run(
            f"[{name}] PromQL (KEDA, alerts, dashboard) parses and names only exported metrics",
            lambda objects=objects: check_promql(objects),
        )
    report.run(
        "upgrading one stage's image tag changes only that stage (defaults)",
        lambda: check_stage_isolation({}),
    )
    for example in EXAMPLES:
        report.run(
            f"upgrading one stage's image tag changes only that stage (examples/{example.name})",
            lambda e=example: check_stage_isolation(load_yaml(e)),
        )
    report.run("chart README values table matches values.yaml", check_readme)
    print(f"check_chart: {report.passes} passed, {report.failures} failed")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
