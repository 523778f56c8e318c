# The two commands: `make demo` (run it) and `make test` (test it). Everything installs itself.
SHELL := /bin/bash
PY := .venv/bin/python
MODEL_DIR ?= .cache/tiny-glm-image
ENGINE ?= vllm
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm

.PHONY: setup stubs tiny-model lint test demo serve lint-deploy bench clean

setup:
	@scripts/setup.sh

stubs: setup
	@$(PY) protos/generate.py >/dev/null

tiny-model: setup
	@$(PY) -m testkit.tiny_model $(MODEL_DIR)

lint: stubs
	@.venv/bin/ruff check .
	@.venv/bin/ruff format --check .
	@.venv/bin/mypy

# Dockerfiles (hadolint) and the Helm chart (helm lint, schema, render, PromQL); installs its own tools.
# The stubs: the chart's queries are checked against the metrics the services' modules register.
lint-deploy: stubs
	@scripts/lint_deploy.sh

test: stubs tiny-model lint lint-deploy
	@MODEL_DIR=$(MODEL_DIR) $(PY) -m pytest -q $(PYTEST_ARGS)

# The three services on loopback (gateway 50050, planner 50051, decoder 50052) until Ctrl-C.
serve: stubs tiny-model
	@$(PY) -m testkit.cluster $(MODEL_DIR) --engine $(ENGINE)

# serve + one request through the CLI -> out/demo.png
demo: stubs tiny-model
	@mkdir -p out
	@MODEL_DIR=$(MODEL_DIR) ENGINE=$(ENGINE) scripts/demo.sh

# The figures in the README (each script prints its own; several minutes in all).
bench: stubs tiny-model
	@MODEL_DIR=$(MODEL_DIR) $(PY) benchmarks/planner_engines.py --model $(MODEL_DIR)
	@MODEL_DIR=$(MODEL_DIR) $(PY) benchmarks/decoder_tail_latency.py
	@MODEL_DIR=$(MODEL_DIR) $(PY) benchmarks/split_overhead.py --model $(MODEL_DIR)
	@MODEL_DIR=$(MODEL_DIR) $(PY) benchmarks/cluster_throughput.py --model $(MODEL_DIR) --planners 1 --decoders 2 --requests 48

clean:
	rm -rf .cache out glmimage
