#!/usr/bin/env bash
# The GPU kit on one GPU machine that reaches no package registry: installs the wheels that
# benchmarks/gpu/wheels.sh fetched (carried with the tree in .cache/gpu-wheels) into /tmp/site, then
# runs benchmarks/gpu/kit.py with the arguments given (defaults: the full-size model in bf16 on cuda,
# 1024x1024 and 2048x2048, 10 steps). Needs python3 with torch (CUDA) and transformers, and the
# generated stubs (glmimage/, from `make stubs`). Sized for 8 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -d .cache/gpu-wheels ]; then
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .cache/gpu-wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
test -f glmimage/v1/common_pb2.py || { echo "run.sh: no stubs in glmimage/ (make stubs, and carry glmimage)" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c 'import sys, torch, transformers, diffusers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)'
exec python3 -u benchmarks/gpu/kit.py "$@"
