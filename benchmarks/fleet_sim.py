"""Fleet simulation: one day of traffic on (a) the split stages, each autoscaled as the chart's KEDA
ScaledObjects do it, and (b) monolithic replicas that run a request's plan and then its image on one
GPU, one request at a time (a diffusers pipeline behind a queue). Prints GPU-hours at the same p95
target and the latency of both at the same GPU count; draws the day (--plot). docs/capacity.md
explains the model; the stage rates default to the published GLM-Image figures (1024x1024, 50 steps).

    .venv/bin/python benchmarks/fleet_sim.py [--peak-rate 0.5] [--p95 120] [--plot docs/capacity-day.png] \\
        [gateway.capacity's rate flags: --planner, --decoder-seconds, --mix, ...]
    .venv/bin/python benchmarks/fleet_sim.py --validate   # the model against the real stack on this machine

--validate runs the real stack on this machine (tiny model, one planner, one decoder) at three open-loop
loads; before each it measures the stages (planner plans/s at 1, 2, 4 and 8 plans at once, one decoder's
images/s, their spread, and both loaded at once: they share the CPU), then simulates the load from those
measurements with the same arrival times.
"""

import argparse
import concurrent.futures
import itertools
import math
import os
import random
import statistics
import threading
from dataclasses import dataclass
from pathlib import Path

import cluster_throughput
import simpy
import yaml

from gateway.capacity import Curve, Stage, add_rate_arguments, mean_in_stage, size, stages_from_args

REPO = Path(__file__).resolve().parent.parent
DAY = 24 * 3600.0
# Published per-image figures, 1024x1024, 50 steps (sources in docs/capacity.md):
AR_SECONDS = 25.8  # the AR stage alone (vLLM-Omni, max_num_seqs 1)
AR_BATCH_GAIN = 3.5  # batched AR throughput, batch 16 over batch 1 (SGLang's batched AR server: 0.2 -> 0.74 img/s)
DIT_SECONDS = 11.0  # the DiT per image (vLLM-Omni)
# Kubernetes' HPA defaults, which KEDA's ScaledObjects run on
HPA_TOLERANCE = 0.1  # no change while demand / (threshold x pods) is within 10 % of 1
HPA_UP_PODS = 4  # scale up by at most max(4 pods, 100 %) per 15 s (one poll)


@dataclass
class Scaling:
    """A stage's autoscaler as the chart sets it up: desired pods = ceil(demand / threshold), demand =
    requests waiting at the gateway + running on the stage's pods, polled every `polling_s`; scale-down
    takes the highest recommendation of the last `window_s` and at most `down_pods` per `down_period_s`."""

    low: int
    high: int
    threshold: float
    polling_s: float
    window_s: float
    down_pods: int
    down_period_s: float

    @classmethod
    def from_chart(cls, stage: str, low: int, high: int, threshold: float) -> "Scaling":
        values = yaml.safe_load((REPO / "helm/glm-image-serve/values.yaml").read_text())[stage]["autoscaling"]
        down = values["behavior"]["scaleDown"]
        policy = down["policies"][0]
        return cls(low, high, threshold, values["pollingInterval"], down["stabilizationWindowSeconds"],
                   policy["value"], policy["periodSeconds"])  # fmt: skip


@dataclass(eq=False)
class Request:
    cls: str
    arrival: float
    stage: int = 0  # index of the stage it is in or waiting for
    pod: "Pod | None" = None
    over: bool = False  # completed or past its deadline
    latency: float = math.inf  # inf: past its deadline


class Pod:
    """Runs up to curve.max_batch requests at once, each progressing at curve(batch) / batch work units
    per second (a continuous batch; a decoder's curve runs one). Takes `startup_s` to load."""

    def __init__(self, fleet: "Fleet", stage: Stage, startup_s: float):
        self.fleet, self.stage, self.env = fleet, stage, fleet.env
        self.jobs: dict[Request, float] = {}  # work left
        self.ready = self.draining = False
        self.since = self.speed = 0.0
        self.born = self.env.now
        self.wake = self.env.event()
        self.env.process(self.run(startup_s))

    def per_job_speed(self) -> float:
        if not self.jobs:
            return 0.0
        batch = len(self.jobs)
        return self.stage.curve(batch) / batch * self.fleet.slowdown_of(self.stage.name)

    def advance(self) -> None:
        """Books the progress since the last change, at the speed of that interval."""
        done = (self.env.now - self.since) * self.speed
        for request in self.jobs:
            self.jobs[request] -= done
        self.since = self.env.now

    def retime(self) -> None:
        """After a change of jobs or of the machine's load: new speed, and the run loop re-plans."""
        self.advance()
        self.speed = self.per_job_speed()
        if not self.wake.triggered:
            self.wake.succeed()

    def add(self, request: Request) -> None:
        self.advance()
        self.jobs[request] = self.stage.work[request.cls] * self.fleet.work_factor(self.stage.name)
        request.pod = self
        self.retime()
        if len(self.jobs) == 1:
            self.fleet.busy_changed(self.stage.name, +1)

    def drop(self, request: Request) -> None:
        self.advance()
        del self.jobs[request]
        request.pod = None
        self.retime()
        if not self.jobs:
            self.fleet.busy_changed(self.stage.name, -1)

    def remove(self) -> None:
        """Scaled down: takes no more requests and ends once its own are done (at once while loading)."""
        self.draining = True
        self.retime()

    def run(self, startup_s: float):
        yield self.env.timeout(startup_s) | self.wake  # woken while loading only to be removed
        self.ready = True
        self.fleet.dispatch(self.stage.name)
        while not (self.draining and not self.jobs):
            self.wake = self.env.event()
            if self.jobs:
                yield self.env.timeout(min(self.jobs.values()) / self.speed) | self.wake
            else:
                yield self.wake
            self.advance()
            for request in [r for r, left in self.jobs.items() if left <= 1e-9]:
                self.drop(request)
                self.fleet.next_stage(request)
            self.fleet.dispatch(self.stage.name)
        self.fleet.retire(self)

    def room(self) -> bool:
        return self.ready and not self.draining and len(self.jobs) < self.stage.curve.max_batch


@dataclass
class Result:
    latencies: list[float]  # per request, in arrival order; inf = past its deadline
    completions: list[tuple[float, float]]  # (time, latency) of the completed
    gpu_seconds: float
    pods: list[tuple[float, dict[str, int]]]  # (time, pods per stage) every minute

    def percentile(self, q: float) -> float:
        return cluster_throughput.percentile(self.latencies, q)

    @property
    def missed(self) -> int:
        return sum(math.isinf(v) for v in self.latencies)


class Fleet:
    """The gateway (one queue per stage, arrival order, deadlines) and the stages' pods."""

    def __init__(self, stages: list[Stage], pods: dict[str, int], scaling: dict[str, Scaling] | None = None,
                 startup_s: float = 0.0, deadline_s: float = 600.0, slowdown: dict[str, float] | None = None,
                 spread: dict[str, dict[bool, list[float]]] | None = None, overhead_s: float = 0.0,
                 seed: int = 0):  # fmt: skip
        self.env = simpy.Environment()
        self.stages = stages
        self.startup_s, self.deadline_s = startup_s, deadline_s
        self.slowdown = slowdown or {}  # stages sharing one machine: speed factor while another stage is busy
        # per stage, factors (mean 1) a request's work is drawn from, by whether another stage is busy
        # when it starts (sharing a machine makes the times spread more); none: fixed times
        self.spread = spread or {}
        self.random = random.Random(seed)
        self.overhead_s = overhead_s  # added to every request's latency (the gateway's hops)
        self.busy = {s.name: 0 for s in stages}
        self.queues: dict[str, list[Request]] = {s.name: [] for s in stages}
        self.pods: dict[str, list[Pod]] = {s.name: [Pod(self, s, 0.0) for _ in range(pods[s.name])] for s in stages}
        self.gpu_seconds = 0.0
        self.completions: list[tuple[float, float]] = []
        self.open = 0  # requests arrived and not over
        self.arrived_all = False
        self.all_over = self.env.event()
        for stage in stages if scaling else []:
            self.env.process(self.autoscale(stage, scaling[stage.name]))

    def work_factor(self, stage: str) -> float:
        if stage not in self.spread:
            return 1.0
        return self.random.choice(self.spread[stage][self.others_busy(stage)])

    def others_busy(self, stage: str) -> bool:
        return any(count for name, count in self.busy.items() if name != stage)

    def slowdown_of(self, stage: str) -> float:
        return self.slowdown.get(stage, 1.0) if self.others_busy(stage) else 1.0

    def busy_changed(self, stage: str, delta: int) -> None:
        self.busy[stage] += delta
        if self.slowdown:
            for name, pods in self.pods.items():
                if name != stage:
                    for pod in pods:
                        pod.retime()

    def dispatch(self, stage: str) -> None:
        """Requests leave the stage's queue, in order, for the pod with the most room."""
        queue = self.queues[stage]
        while queue:
            free = [p for p in self.pods[stage] if p.room()]
            if not free:
                return
            min(free, key=lambda p: len(p.jobs)).add(queue.pop(0))

    def enter(self, request: Request) -> None:
        self.queues[self.stages[request.stage].name].append(request)
        self.dispatch(self.stages[request.stage].name)

    def next_stage(self, request: Request) -> None:
        request.stage += 1
        if request.stage < len(self.stages):
            self.enter(request)
        else:
            done = self.env.now + self.overhead_s
            request.latency = done - request.arrival
            self.completions.append((done, request.latency))
            self.close(request)

    def close(self, request: Request) -> None:
        request.over = True
        self.open -= 1
        if not self.open and self.arrived_all:
            self.all_over.succeed()

    def expire(self, request: Request) -> None:
        """The deadline: the request leaves wherever it is (DEADLINE_EXCEEDED)."""
        if request.over:
            return
        stage = self.stages[request.stage].name
        if request.pod is not None:
            request.pod.drop(request)
            self.dispatch(stage)
        else:
            self.queues[stage].remove(request)
        self.close(request)

    def retire(self, pod: Pod) -> None:
        self.pods[pod.stage.name].remove(pod)
        self.gpu_seconds += self.env.now - pod.born

    def autoscale(self, stage: Stage, scaling: Scaling):
        recommendations: list[tuple[float, int]] = []
        last_down = -math.inf
        while True:
            yield self.env.timeout(scaling.polling_s)
            now, pods = self.env.now, [p for p in self.pods[stage.name] if not p.draining]
            count = len(pods)
            demand = len(self.queues[stage.name]) + sum(len(p.jobs) for p in pods)
            desired = count
            if abs(demand / (scaling.threshold * count) - 1) > HPA_TOLERANCE:
                desired = min(max(math.ceil(demand / scaling.threshold), scaling.low), scaling.high)
            recommendations = [(t, d) for t, d in recommendations if t > now - scaling.window_s] + [(now, desired)]
            stable = max(d for _, d in recommendations)  # scaling down follows the window's highest
            if desired > count:
                added = min(desired, max(2 * count, count + HPA_UP_PODS)) - count
                self.pods[stage.name] += [Pod(self, stage, self.startup_s) for _ in range(added)]
            elif stable < count and now - last_down >= scaling.down_period_s:
                last_down = now
                # Kubernetes removes pods that are not ready first, then (here) the least loaded
                for pod in sorted(pods, key=lambda p: (p.ready, len(p.jobs)))[: min(count - stable, scaling.down_pods)]:
                    pod.remove()

    def record_pods(self, every_s: float, into: list):
        while True:
            into.append((self.env.now, {name: len(pods) for name, pods in self.pods.items()}))
            yield self.env.timeout(every_s)

    def run(self, arrivals: list[tuple[float, str]]) -> Result:
        """Feeds the (time, class) arrivals and runs until every request is over."""
        requests = [Request(cls, t) for t, cls in arrivals]

        def feed():
            for i, request in enumerate(requests):
                yield self.env.timeout(request.arrival - self.env.now)
                self.open += 1
                self.arrived_all = i == len(requests) - 1
                self.enter(request)
                self.env.timeout(self.deadline_s).callbacks.append(lambda _, r=request: self.expire(r))

        pods: list = []
        self.env.process(feed())
        self.env.process(self.record_pods(60.0, pods))
        self.env.run(until=self.all_over)
        self.gpu_seconds += sum(self.env.now - p.born for stage_pods in self.pods.values() for p in stage_pods)
        return Result([r.latency for r in requests], self.completions, self.gpu_seconds, pods)


def day_arrivals(args, mix: dict[str, float]) -> tuple[list[tuple[float, str]], list[float]]:
    """A day of Poisson arrivals (by thinning) and the bursts' start times: diurnal, from `trough` x the
    peak rate at hour 0 to the peak at hour 12 and back, and bursts that multiply the rate for a few minutes."""
    rng = random.Random(args.seed)
    burst_s = args.burst_minutes * 60
    bursts = sorted(rng.uniform(0, DAY - burst_s) for _ in range(args.bursts))

    def rate(t: float) -> float:
        diurnal = args.trough + (1 - args.trough) * (1 - math.cos(2 * math.pi * t / DAY)) / 2
        return args.peak_rate * diurnal * (args.burst_factor if any(b <= t < b + burst_s for b in bursts) else 1)

    top = args.peak_rate * args.burst_factor
    arrivals, t = [], 0.0
    while (t := t + rng.expovariate(top)) < DAY:
        if rng.random() < rate(t) / top:
            arrivals.append((t, rng.choices(list(mix), list(mix.values()))[0]))
    return arrivals, bursts


def monolithic(planner: Stage, decoder: Stage) -> Stage:
    """A replica runs one request at a time on one GPU: its plan alone (batch 1), then its image."""
    work = {cls: planner.idle_time(cls) + decoder.idle_time(cls) for cls in planner.work}
    return Stage("replica", Curve(((1, 1.0),)), work)


CHART_BLOCK = {"planner": "planner", "decoder": "decoder", "replica": "decoder"}  # a replica scales like a decoder
THRESHOLD_FACTORS = (0.5, 0.7, 1.0, 1.4, 2.0, 2.8)


def autoscaled(stages: list[Stage], mix: dict[str, float], args, arrivals) -> tuple[float, Result]:
    """The day with every stage autoscaled, its KEDA range from gateway.capacity: minReplicas for the
    trough rate, maxReplicas for the bursts' rate, threshold = the mean demand per pod at the peak rate
    times a factor; of the factors tried, the one with the fewest GPU-hours whose p95 meets the target
    (else the lowest p95). Starts with the pods for the trough, where the day starts."""
    low, peak, high = (size(stages, args.peak_rate * f, mix, args.p95) for f in (args.trough, 1, args.burst_factor))
    runs = []
    for factor in THRESHOLD_FACTORS:
        scaling = {
            s.name: Scaling.from_chart(CHART_BLOCK[s.name], low[s.name], high[s.name],
                                       factor * mean_in_stage(s, peak[s.name], args.peak_rate, mix) / peak[s.name])
            for s in stages
        }  # fmt: skip
        runs.append((factor, Fleet(stages, low, scaling, args.startup_seconds, args.deadline_seconds).run(arrivals)))
    meeting = [(factor, result) for factor, result in runs if result.percentile(0.95) <= args.p95]
    if meeting:
        return min(meeting, key=lambda run: run[1].gpu_seconds)
    return min(runs, key=lambda run: run[1].percentile(0.95))


def table_row(name: str, result: Result) -> str:
    counts = [sum(pods.values()) for _, pods in result.pods]
    return (f"{name:<56} {result.gpu_seconds / DAY:>6.1f} {max(counts):>5} {result.gpu_seconds / 3600:>9.1f} "
            f"{result.percentile(0.5):>7.1f} {result.percentile(0.95):>7.1f} {result.percentile(0.99):>7.1f} "
            f"{result.missed:>8}")  # fmt: skip


def plot_day(path: str, args, arrivals, split: Result, mono: Result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (load, pods, p95) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    bins = [0] * int(DAY // 300)
    for t, _ in arrivals:
        bins[int(t // 300)] += 1
    load.plot([(i + 0.5) * 300 / 3600 for i in range(len(bins))], [b / 300 for b in bins], lw=1)
    load.set_ylabel("arrivals, images/s\n(5-min bins)")
    hours = [t / 3600 for t, _ in split.pods]
    for name in split.pods[0][1]:
        pods.step(hours, [p[name] for _, p in split.pods], where="post", label=f"split: {name} pods")
    pods.step(hours, [sum(p.values()) for _, p in split.pods], where="post", label="split: GPUs", color="k")
    pods.step([t / 3600 for t, _ in mono.pods], [sum(p.values()) for _, p in mono.pods], where="post",
              label="monolithic: GPUs", color="tab:red", ls="--")  # fmt: skip
    pods.set_ylabel("pods (GPUs)")
    pods.legend(loc="upper left", fontsize=8)
    for name, result, style in (("split", split, "k-"), ("monolithic", mono, "r--")):
        windows: dict[int, list[float]] = {}
        for t, latency in result.completions:
            windows.setdefault(int(t // 900), []).append(latency)
        keys = sorted(windows)
        p95.plot([(k + 0.5) / 4 for k in keys], [cluster_throughput.percentile(windows[k], 0.95) for k in keys],
                 style, lw=1, label=name)  # fmt: skip
    p95.axhline(args.p95, color="gray", ls=":", label=f"target {args.p95:g} s")
    p95.set_ylabel("p95 latency, s\n(15-min windows)")
    p95.set_xlabel("hours since the day's lowest traffic")
    p95.legend(loc="upper left", fontsize=8)
    load.set_title(f"One simulated day, peak {args.peak_rate:g} images/s, autoscaled (seed {args.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def simulate_day(args) -> None:
    stages, mix = stages_from_args(args)
    replica = monolithic(*stages)
    arrivals, bursts = day_arrivals(args, mix)
    print(f"one day: {len(arrivals)} requests, peak {args.peak_rate:g} images/s, trough {args.trough:.0%} of it, "
          f"{args.bursts} bursts x{args.burst_factor:g} for {args.burst_minutes:g} min (at "
          f"{', '.join(f'{b / 3600:.1f} h' for b in bursts)}), mix "
          f"{', '.join(f'{c} {s:.0%}' for c, s in mix.items())}; pod start-up {args.startup_seconds:g} s, "
          f"deadline {args.deadline_seconds:g} s, p95 target {args.p95:g} s, seed {args.seed}")  # fmt: skip
    print(f"per request: plan {stages[0].idle_time(next(iter(mix))):.1f} s alone, "
          f"{stages[0].curve.max_batch:g} at once at {stages[0].curve.max_rate:.4f} plans/s per planner; "
          f"image {stages[1].idle_time(next(iter(mix))):.1f} s; monolithic replica "
          f"{replica.idle_time(next(iter(mix))):.1f} s")  # fmt: skip
    split_factor, split = autoscaled(stages, mix, args, arrivals)
    mono_factor, mono = autoscaled([replica], mix, args, arrivals)
    fixed = size(stages, args.peak_rate, mix, args.p95)  # the split sized for the peak rate
    gpus = sum(fixed.values())
    split_fixed = Fleet(stages, fixed, deadline_s=args.deadline_seconds).run(arrivals)
    mono_fixed = Fleet([replica], {"replica": gpus}, deadline_s=args.deadline_seconds).run(arrivals)

    print(f"{'fleet':<56} {'GPUs':>6} {'max':>5} {'GPU-hours':>9} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} "
          f"{'deadline':>8}")  # fmt: skip
    print(table_row(f"(a) split, autoscaled (thresholds x{split_factor:g})", split))
    print(table_row(f"(b) monolithic, autoscaled (threshold x{mono_factor:g})", mono))
    print(table_row(f"(a) split, fixed {gpus} GPUs ({fixed['planner']} planner + {fixed['decoder']} decoder pods)",
                    split_fixed))  # fmt: skip
    print(table_row(f"(b) monolithic, fixed {gpus} GPUs", mono_fixed))
    print(f"GPU-hours at the p95 target: split / monolithic = {split.gpu_seconds / mono.gpu_seconds:.2f}")
    if args.plot:
        plot_day(args.plot, args, arrivals, split, mono)
        print(f"plot: {args.plot}")


REPLICAS = 20  # simulated runs per measured load (service times drawn anew each time)
TOGETHER_IMAGES = 24  # images made while the planner is loaded too: a few seconds of both stages busy
# The model binds a request to a decoder when its plan is complete. The gateway's default binds about
# 1 s before: ~4 % of a GPU plan, but the whole of a tiny-model plan (~1 s), which would hold a decoder
# place for the whole plan here.
BIND_AT_PLAN_END = "--decoder-bind-lead-seconds 0"


@dataclass
class Measured:
    stages: list[Stage]
    slowdown: dict[str, float]
    spread: dict[str, dict[bool, list[float]]]
    overhead_s: float
    summary: str


def relative(values: list[float]) -> list[float]:
    mean = statistics.mean(values)
    return [v / mean for v in values]


def measure(cluster, run, width: int, height: int) -> Measured:
    """The stages alone: planner plans/s with 1, 2, 4 and 8 plans at once (closed loop) and one
    decoder's images/s; the spread of their service times (each plan's seconds over the mean at its
    batch size, each image's Timings over their mean); each stage's speed and spread while the other one
    is loaded too (they share this machine's cores); and what one request at a time through the gateway
    takes beyond a plan and an image alone (its hops)."""
    points, plan_spread = [], []
    for batch in (1, 2, 4, 8):
        at = argparse.Namespace(**{**vars(run), "concurrency": batch, "requests": max(6, 2 * batch)})
        plans_per_s, plans, seconds = cluster_throughput.planner_only(cluster, at, width, height)
        points.append((float(batch), plans_per_s))
        plan_spread += relative(seconds)
    decoder_args = argparse.Namespace(**{**vars(run), "requests": 24})
    images_per_s, image_seconds = cluster_throughput.decoder_only(cluster, decoder_args, plans, width, height)
    # both loaded: plans 4 at a time, 8 a round, for as long as the decoder makes TOGETHER_IMAGES images
    rounds, done = [], threading.Event()
    together_planner = argparse.Namespace(**{**vars(run), "concurrency": 4, "requests": 8})
    together_decoder = argparse.Namespace(**{**vars(run), "requests": 2 * TOGETHER_IMAGES})

    def load_planner() -> None:
        while not done.is_set():
            rounds.append(cluster_throughput.planner_only(cluster, together_planner, width, height))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        planner = pool.submit(load_planner)
        decoder_rate, together_images = cluster_throughput.decoder_only(cluster, together_decoder, plans, width, height)
        done.set()
        planner.result()
    planner_rate = 8 * len(rounds) / sum(8 / rate for rate, _, _ in rounds)
    together_plans = [v for _, _, seconds in rounds for v in relative(seconds)]
    # at most 1: sharing cores slows; a ratio above 1 is this machine's drift between the two runs
    slowdown = {"planner": min(1.0, planner_rate / points[2][1]), "decoder": min(1.0, decoder_rate / images_per_s)}
    spread = {"planner": {False: plan_spread, True: together_plans},
              "decoder": {False: relative(image_seconds), True: relative(together_images)}}  # fmt: skip
    cls = f"{width}x{height}@{run.steps}"
    rates = argparse.Namespace(planner=points, planner_seconds=[], planner_size=f"{width}x{height}",
                               decoder=[(cls, images_per_s)], decoder_seconds=[], from_json=[], mix=[])  # fmt: skip
    stages, _ = stages_from_args(rates)
    alone = cluster_throughput.through_gateway(cluster, run, width, height, requests=5, concurrency=1)["p50_s"]
    overhead = max(0.0, alone - sum(stage.idle_time(cls) for stage in stages))
    summary = (", ".join(f"{r:.2f} plans/s at {b:g}" for b, r in points) + f"; decoder {images_per_s:.2f} images/s; "
               f"both loaded: planner x{slowdown['planner']:.2f}, decoder x{slowdown['decoder']:.2f}; "
               f"gateway hops {overhead:.2f} s")  # fmt: skip
    return Measured(stages, slowdown, spread, overhead, summary)


def validate(args) -> None:
    """The real three-process stack (tiny model, one planner, one decoder, one CPU thread per stage
    process). For each load: the stages measured (this machine's speed drifts), then an open-loop load
    through the gateway, simulated from those measurements with the same arrival times."""
    width, height = (int(v) for v in args.validate_size.split("x"))
    cls = f"{args.validate_size}@{args.validate_steps}"
    run = argparse.Namespace(model=args.model, engine="vllm", planners=1, decoders=1, gateway_args=BIND_AT_PLAN_END, threads=1,
                             steps=args.validate_steps, concurrency=1, requests=0, rate=0.0)  # fmt: skip
    worst = None
    with cluster_throughput.started_cluster(run, width, height) as cluster:
        for fraction in args.validate_loads:
            m = measure(cluster, run, width, height)
            planner, decoder = m.stages
            # what the two sustain when both are busy: the fastest planner batch, or the decoder
            bound = min(planner.curve.max_rate * m.slowdown["planner"], m.slowdown["decoder"] / decoder.work[cls])
            rate = fraction * bound
            load = argparse.Namespace(**{**vars(run), "rate": rate, "requests": args.validate_requests})
            measured = cluster_throughput.through_gateway(cluster, load, width, height)
            arrivals = [(t, cls) for t in itertools.accumulate(cluster_throughput.poisson_gaps(load.requests, rate))]
            runs = [Fleet(m.stages, {"planner": 1, "decoder": 1}, slowdown=m.slowdown, spread=m.spread,
                          overhead_s=m.overhead_s, seed=seed).run(arrivals) for seed in range(REPLICAS)]  # fmt: skip
            predicted = (sum(load.requests / max(t for t, _ in r.completions) for r in runs) / REPLICAS,
                         sum(r.percentile(0.95) for r in runs) / REPLICAS)  # fmt: skip
            actual = (measured["images_per_s"], measured["p95_s"])
            error = 100 * max(abs(guess - real) / real for guess, real in zip(predicted, actual, strict=True))
            line = (f"predicted {predicted[0]:.2f} img/s p95 {predicted[1]:.2f} s, measured {actual[0]:.2f} img/s p95 "
                    f"{actual[1]:.2f} s, error {error:.1f} %")  # fmt: skip
            print(f"measured: planner {m.summary}; machine load average {os.getloadavg()[0]:.1f}", flush=True)
            print(f"load {rate:.2f}/s ({fraction:.0%} of {bound:.2f}/s), {load.requests} requests: {line} (p50 "
                  f"predicted {sum(r.percentile(0.5) for r in runs) / REPLICAS:.2f} s, measured {measured['p50_s']:.2f} s"
                  + (f"; errors {measured['errors']}" if measured["errors"] else "") + ")", flush=True)  # fmt: skip
            worst = max(worst or (error, line), (error, line))
    print(f"validation: {worst[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--peak-rate", type=float, default=0.5, help="images/s at the day's peak (hour 12)")
    parser.add_argument("--trough", type=float, default=0.2, help="the rate at hour 0, as a fraction of the peak")
    parser.add_argument("--bursts", type=int, default=4, help="bursts at random times of the day")
    parser.add_argument("--burst-factor", type=float, default=2.0, help="a burst multiplies the rate by this")
    parser.add_argument("--burst-minutes", type=float, default=10.0)
    parser.add_argument("--p95", type=float, default=120.0, help="p95 latency target, seconds")
    parser.add_argument("--startup-seconds", type=float, default=180.0, help="a new pod's time to load and warm up")
    parser.add_argument("--deadline-seconds", type=float, default=600.0, help="the gateway's default deadline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="", help="PNG of the day (load, pods per stage, p95)")
    parser.add_argument("--validate", action="store_true", help="check the model against the real stack here")
    parser.add_argument("--model", default=os.environ.get("MODEL_DIR", ".cache/tiny-glm-image"), help="--validate")
    parser.add_argument("--validate-size", default="256x256")
    parser.add_argument("--validate-steps", type=int, default=8)
    parser.add_argument("--validate-requests", type=int, default=60, help="requests per load")
    parser.add_argument("--validate-loads", type=lambda t: [float(v) for v in t.split(",")], default=[0.3, 0.5, 0.7],
                        help="open-loop rates as fractions of the measured bound")  # fmt: skip
    add_rate_arguments(parser)
    args = parser.parse_args()
    # the published figures for the rates not given
    if not (args.planner or args.planner_seconds or args.from_json):
        args.planner = [(1.0, 1 / AR_SECONDS), (16.0, AR_BATCH_GAIN / AR_SECONDS)]
        args.planner_size = args.planner_size or "1024x1024"
    if not (args.decoder or args.decoder_seconds or args.from_json):
        args.decoder_seconds = [("1024x1024@50", DIT_SECONDS)]
    if args.validate:
        validate(args)
    else:
        simulate_day(args)


if __name__ == "__main__":
    main()
