"""Cluster throughput: P planners and D decoders behind one name each, driven through the gateway.

Closed loop at concurrency C (or open loop at --rate requests/s), then prints images/s, latency
percentiles, errors by status code, each stage's busy fraction (time with a request being served:
a plan generating, a decode denoising), and the bound measured in the same run:
min(planner-only plans/s at concurrency C, D x decoder-only images/s fed stored plans).
With --previews N, what previews cost: the same load without and with every request asking for N,
alternated --repeats times (this machine's noise is larger than the effect), and one request at a
time with and without them (--latency-requests each).

    .venv/bin/python benchmarks/cluster_throughput.py --planners 1 --decoders 2 --concurrency 16 \
        [--requests 64] [--rate 0] [--size 256x256] [--steps 8] [--engine vllm] [--gateway-args "..."] \
        [--previews 0] [--repeats 3] [--latency-requests 8] [--json]
"""

import argparse
import collections
import concurrent.futures
import contextlib
import itertools
import json
import os
import random
import shlex
import statistics
import threading
import time
from collections.abc import Iterator

import grpc

from gateway.client import ImageClient
from glmimage.v1 import decoder_pb2, decoder_pb2_grpc, planner_pb2, planner_pb2_grpc
from testkit.cluster import Cluster
from testkit.hosts import HostsEntries

PROMPT = "a poster that says 'HELLO'"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def poisson_gaps(jobs: int, rate: float) -> list[float]:
    """Seconds before each of `jobs` arrivals at `rate`/s (seeded: benchmarks/fleet_sim.py replays them)."""
    arrivals = random.Random(0)
    return [arrivals.expovariate(rate) for _ in range(jobs)]


def run_pool(jobs: int, concurrency: int, work, rate: float = 0.0) -> float:
    """Runs work(i) for i < jobs with at most `concurrency` at once (or arriving at `rate`/s, Poisson);
    returns the wall seconds."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(concurrency, 1) if not rate else jobs) as pool:
        futures = []
        for i, at in enumerate(itertools.accumulate(poisson_gaps(jobs, rate)) if rate else [0.0] * jobs):
            time.sleep(max(0.0, started + at - time.perf_counter()))  # on schedule: late wake-ups do not add up
            futures.append(pool.submit(work, i))
        for future in futures:
            future.result()
    return time.perf_counter() - started


def planner_only(cluster: Cluster, args, width: int, height: int) -> tuple[float, list[list], list[float]]:
    """Plans/s with C streams spread over the planner pods; the plans, kept for the decoders; each
    plan's seconds."""
    channels = [grpc.insecure_channel(p.address) for p in cluster.pods("planner")]
    stubs = [planner_pb2_grpc.PlannerServiceStub(c) for c in channels]
    plans: list[list] = [None] * args.requests
    seconds = [0.0] * args.requests

    def plan(i: int) -> None:
        started = time.perf_counter()
        request = planner_pb2.PlanRequest(prompt=PROMPT, width=width, height=height, seed=i)
        plans[i] = list(stubs[i % len(stubs)].Plan(request, timeout=600))
        seconds[i] = time.perf_counter() - started

    wall = run_pool(args.requests, args.concurrency, plan)
    for c in channels:
        c.close()
    return args.requests / wall, plans, seconds


def decoder_only(cluster: Cluster, args, plans: list[list], width: int, height: int) -> tuple[float, list[float]]:
    """Images/s of one decoder pod fed stored plans, two calls in flight so that it never waits; each
    image's seconds of work (denoising, VAE decode, encoding: its Timings)."""
    pod = cluster.pods("decoder")[0]
    work = []
    with grpc.insecure_channel(pod.address) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)

        def decode(i: int) -> None:
            spec = decoder_pb2.DecodeSpec(prompt=PROMPT, width=width, height=height, seed=i,
                                          num_inference_steps=args.steps)  # fmt: skip
            chunks = plans[i % len(plans)]
            requests = [
                decoder_pb2.DecodeRequest(spec=spec),
                *(decoder_pb2.DecodeRequest(plan_chunk=c) for c in chunks),
            ]
            for event in stub.Decode(iter(requests), timeout=600):
                if event.HasField("completed"):
                    t = event.completed.timings
                    work.append(t.denoising_seconds + t.vae_decode_seconds + t.encode_seconds)

        count = max(args.requests // 2, 8)
        return count / run_pool(count, 2, decode), work


def through_gateway(cluster: Cluster, args, width: int, height: int, previews: int = 0, requests: int = 0,
                    concurrency: int = 0) -> dict:  # fmt: skip
    """The measured load (`requests`, `concurrency`: those of args unless given), each request asking
    for `previews` previews."""
    latencies, errors = [], collections.Counter()
    delivered = 0
    lock = threading.Lock()
    pods = [(p, kind) for kind in ("planner", "decoder") for p in cluster.pods(kind)]
    requests, concurrency = requests or args.requests, concurrency or args.concurrency
    with ImageClient(cluster.gateway.address) as client:

        def one(i: int) -> None:
            nonlocal delivered
            started = time.perf_counter()
            try:
                result = client.generate(PROMPT, width, height, seed=1000 + i, num_inference_steps=args.steps,
                                         previews=previews, timeout=600)  # fmt: skip
                with lock:
                    latencies.append(time.perf_counter() - started)
                    delivered += result.completed.previews
            except grpc.RpcError as error:
                with lock:
                    errors[error.code().name] += 1

        busy_before = {p.name: p.metric("glmimage_busy_seconds_total", stage=kind) for p, kind in pods}
        wall = run_pool(requests, concurrency, one, args.rate if concurrency == args.concurrency else 0.0)
        busy = {p.name: (p.metric("glmimage_busy_seconds_total", stage=kind) - busy_before[p.name]) / wall
                for p, kind in pods}  # fmt: skip
    return {
        "images_per_s": len(latencies) / wall,
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        "p99_s": percentile(latencies, 0.99),
        "mean_s": statistics.mean(latencies) if latencies else float("nan"),
        "errors": dict(errors),
        "busy_fraction": busy,
        "wall_s": wall,
        "previews_asked": previews * requests,
        "previews_delivered": delivered,
    }


@contextlib.contextmanager
def started_cluster(args, width: int, height: int) -> Iterator[Cluster]:
    """The cluster of args (model, engine, planners, decoders, threads, gateway args), pods behind one
    name per stage, started and warmed up (every pod, both stages)."""
    threads = {"OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"} if args.threads else {}
    with Cluster(args.model, engine=args.engine, planners=args.planners, decoders=args.decoders,
                 behind_names=HostsEntries.writable(), gateway_args=shlex.split(args.gateway_args),
                 stage_env={"planner": threads, "decoder": threads}) as cluster:  # fmt: skip
        with ImageClient(cluster.gateway.address) as client:
            run_pool(2 * (args.planners + args.decoders), args.planners + args.decoders,
                     lambda i: client.generate(PROMPT, width, height, seed=i, num_inference_steps=1))  # fmt: skip
        yield cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("MODEL_DIR", ".cache/tiny-glm-image"))
    parser.add_argument("--engine", default="vllm", choices=["transformers", "vllm"])
    parser.add_argument("--planners", type=int, default=1)
    parser.add_argument("--decoders", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: arrivals per second (0: closed loop)")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--gateway-args", default="", help="extra gateway flags, e.g. --decoder-bind-lead-seconds 0")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads per stage process (0: the libraries' default, every core); "
        "1 keeps the stages from fighting over a small machine's cores, as separate GPUs would not",
    )  # fmt: skip
    parser.add_argument("--previews", type=int, default=0, help="also measure with every request asking for N previews")
    parser.add_argument("--repeats", type=int, default=3, help="without/with pairs, with --previews")
    parser.add_argument("--latency-requests", type=int, default=8, help="one-at-a-time requests, with --previews")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for gateway.capacity)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with started_cluster(args, width, height) as cluster:
        plans_per_s, plans, _ = planner_only(cluster, args, width, height)
        images_per_s, _ = decoder_only(cluster, args, plans, width, height)
        measured = through_gateway(cluster, args, width, height)
        if args.previews:
            pairs = [(through_gateway(cluster, args, width, height),
                      through_gateway(cluster, args, width, height, previews=args.previews))
                     for _ in range(args.repeats)]  # fmt: skip
            alone = {n: through_gateway(cluster, args, width, height, previews=n, requests=args.latency_requests,
                                        concurrency=1) for n in (0, args.previews)}  # fmt: skip

    bound = min(plans_per_s, args.decoders * images_per_s)
    result = {
        "planners": args.planners, "decoders": args.decoders, "concurrency": args.concurrency,
        "rate": args.rate, "size": args.size, "steps": args.steps, "engine": args.engine,
        "gateway_args": args.gateway_args, "threads": args.threads, "planner_only_plans_per_s": plans_per_s,
        "decoder_only_images_per_s": images_per_s, "bound_images_per_s": bound,
        "fraction_of_bound": measured["images_per_s"] / bound, **measured,
    }  # fmt: skip
    if args.previews:
        result["previews_pairs"] = [{"without": without, "with": with_} for without, with_ in pairs]
        result["one_at_a_time"] = {f"previews_{n}": run for n, run in alone.items()}
    if args.json:
        print(json.dumps(result))
        return
    mode = f"open loop at {args.rate:g}/s" if args.rate else f"closed loop at concurrency {args.concurrency}"
    print(f"{args.planners} planner(s) + {args.decoders} decoder(s), {args.size}, {args.steps} steps, planner engine "
          f"{args.engine}, {mode}, {args.requests} requests {args.gateway_args}")  # fmt: skip
    print(f"planner only: {plans_per_s:.2f} plans/s; one decoder fed stored plans: {images_per_s:.2f} images/s")
    print(f"bound: {bound:.2f} images/s")
    print(f"through the gateway: {measured['images_per_s']:.2f} images/s = {result['fraction_of_bound']:.2f} x bound")
    print(f"latency p50 {measured['p50_s']:.2f} s, p95 {measured['p95_s']:.2f} s, p99 {measured['p99_s']:.2f} s")
    print(f"errors: {measured['errors'] or 'none'}")
    print("busy: " + ", ".join(f"{name} {share:.0%}" for name, share in measured["busy_fraction"].items()))
    if args.previews:
        ratios = []
        for without, with_ in pairs:
            ratios.append(with_["images_per_s"] / without["images_per_s"])
            print(f"without previews {without['images_per_s']:.2f} images/s (p95 {without['p95_s']:.2f} s), with "
                  f"{args.previews} asked per request {with_['images_per_s']:.2f} images/s (p95 {with_['p95_s']:.2f} s, "
                  f"delivered {with_['previews_delivered']} of {with_['previews_asked']}, errors: "
                  f"{with_['errors'] or 'none'}): {ratios[-1]:.2f} x")  # fmt: skip
        print(f"throughput with previews / without, median of {len(ratios)}: {statistics.median(ratios):.2f} x")
        plain, previewed = alone[0], alone[args.previews]
        print(f"one request at a time ({args.latency_requests} each): mean {plain['mean_s']:.3f} s without previews, "
              f"{previewed['mean_s']:.3f} s with {args.previews} (delivered {previewed['previews_delivered']} of "
              f"{previewed['previews_asked']})")  # fmt: skip


if __name__ == "__main__":
    main()
