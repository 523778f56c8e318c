#!/usr/bin/env bash
# The wheels benchmarks/gpu/run.sh installs on the GPU machine, which reaches no package registry:
# diffusers and the services' gRPC, metrics, tracing and HTTP libraries at this project's pins (the
# machine's own grpcio and protobuf may be older than the generated stubs need), for its Python
# 3.12 on x86-64. Large packages the machine already has (torch, transformers, numpy, pillow, ...)
# are left out. Run here, where PyPI is reachable; the wheels go to .cache/gpu-wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=.cache/gpu-wheels
rm -rf "$dir"
mkdir -p "$dir"
python3 -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$dir" \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -r requirements/gateway.txt "$(grep -E '^diffusers==' requirements/cpu.txt)"
# on the machine already (its image lists them), and the largest
rm -f "$dir"/{numpy,pillow,hf_xet,huggingface_hub,safetensors,regex,tokenizers,pyyaml,PyYAML}-*.whl
echo "$(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
