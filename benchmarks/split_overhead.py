"""Split overhead: end-to-end latency through the gateway (planner and decoder as separate
processes) vs the in-process monolithic diffusers pipeline, same model, same request, same seed.

    .venv/bin/python benchmarks/split_overhead.py [--engine transformers|vllm] [--runs 7] [--size 256x256] [--steps 8]
"""

import argparse
import os
import statistics
import time

from gateway.client import ImageClient
from testkit import reference
from testkit.cluster import Cluster

PROMPT = "a poster that says 'HELLO'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("MODEL_DIR", ".cache/tiny-glm-image"))
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    pipe = reference.load_pipeline(args.model)
    reference.render(pipe, PROMPT, width, height, seed=0, steps=1)  # warm-up
    monolithic = []
    for run in range(args.runs):
        started = time.perf_counter()
        reference.render(pipe, PROMPT, width, height, seed=run, steps=args.steps)
        monolithic.append(time.perf_counter() - started)
    del pipe

    with Cluster(args.model, engine=args.engine) as cluster, ImageClient(cluster.gateway.address) as client:
        client.generate(PROMPT, width, height, seed=0, num_inference_steps=1)  # warm-up
        split, first_token = [], []
        for run in range(args.runs):
            started = time.perf_counter()
            result = client.generate(PROMPT, width, height, seed=run, num_inference_steps=args.steps)
            split.append(time.perf_counter() - started)
            first_token.append(result.completed.timings.first_plan_token_seconds)

    mono, gw = statistics.median(monolithic), statistics.median(split)
    print(f"{args.size}, {args.steps} steps, planner engine {args.engine}, median of {args.runs}")
    print(f"monolithic pipeline (in-process): {mono * 1000:8.1f} ms")
    print(
        f"through the gateway (3 processes): {gw * 1000:8.1f} ms  (first plan token {statistics.median(first_token) * 1000:.0f} ms)"
    )
    print(f"split / monolithic: {gw / mono:.3f}x")


if __name__ == "__main__":
    main()
