#!/usr/bin/env bash
# make demo: start the three services, generate one image through the gateway, stop them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL_DIR=${MODEL_DIR:-.cache/tiny-glm-image}
ENGINE=${ENGINE:-vllm}
GATEWAY=127.0.0.1:50050

"$PY" -m testkit.cluster "$MODEL_DIR" --engine "$ENGINE" &
cluster=$!
trap 'kill -TERM $cluster 2>/dev/null; wait $cluster' EXIT
until "$PY" -m servekit.healthcheck --address "$GATEWAY" --timeout 1; do
  kill -0 $cluster 2>/dev/null || { echo "demo: the services failed to start (see out/logs/)" >&2; exit 1; }
  sleep 1
done
"$PY" -m gateway.cli --address "$GATEWAY" generate "a vintage poster that says 'HELLO GLM'" \
  --size 512x512 --seed 7 --steps 20 --out out/demo.png
