"""Capacity planner: pods per stage for a target rate, p95 latency and request mix, from per-stage
rates measured with benchmarks/cluster_throughput.py (--json) or given as flags, and the Helm values
that deploy them. The model is explained in docs/capacity.md.

    python -m gateway.capacity --rate 0.5 --p95 120 --planner 1:0.0388,16:0.1357 --planner-size 1024x1024 \\
        --decoder 1024x1024@50:0.0909 [--mix 1024x1024@50:0.8,512x512@50:0.2] [--base-rate 0.1]
    python -m gateway.capacity --rate 2 --p95 10 --from-json c1.json --from-json c8.json

A request class is WIDTHxHEIGHT@STEPS. Planner rates are plans/s of one pod with B plans generating at
once (--planner B:RATE, or --planner-seconds B:SECONDS_PER_PLAN), for plans of --planner-size; other
sizes cost in proportion to their plan tokens. Decoder rates are images/s of one pod per class
(--decoder CLASS:RATE or --decoder-seconds CLASS:SECONDS); a class measured at other steps is scaled
by its steps.
"""

import argparse
import bisect
import itertools
import json
import math
from dataclasses import dataclass

PREVIEW_SIDE = 16  # the preview grid has ~16 x 16 tokens whatever the image's size


def plan_tokens(width: int, height: int) -> int:
    """Tokens the AR stage generates for a text-to-image plan: the preview grid, the target grid at
    1/32 of the image's sides, and the end token (1281 at 1024x1024)."""
    rows, cols = height // 32, width // 32
    preview = int(math.sqrt(rows / cols) * PREVIEW_SIDE) * int(math.sqrt(cols / rows) * PREVIEW_SIDE)
    return preview + rows * cols + 1


def parse_class(text: str) -> tuple[int, int, int]:
    """'1024x1024@50' -> (1024, 1024, 50)."""
    try:
        size, steps = text.split("@")
        width, height = (int(v) for v in size.lower().split("x"))
        return width, height, int(steps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT@STEPS, got {text!r}") from None


@dataclass(frozen=True)
class Curve:
    """Work one pod completes per second with `batch` requests in it: linear through (0, 0) and the
    given (batch, rate) points, flat beyond the last one, whose batch is the most a pod runs at once
    (the rest wait at the gateway). Batches may be fractional: a stage's requests spread over its pods."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self):
        batches = [b for b, _ in self.points]
        if not self.points or batches != sorted(set(batches)) or min(batches) <= 0:
            raise ValueError(f"batches must be positive and increasing: {self.points}")
        if min(r for _, r in self.points) <= 0:
            raise ValueError(f"rates must be positive: {self.points}")

    def __call__(self, batch: float) -> float:
        x0, y0 = 0.0, 0.0
        for x1, y1 in self.points:
            if batch <= x1:
                return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)
            x0, y0 = x1, y1
        return y0

    @property
    def max_batch(self) -> float:
        return self.points[-1][0]

    @property
    def max_rate(self) -> float:
        return self.points[-1][1]


@dataclass(frozen=True)
class Stage:
    """A stage: its pods' curve, in work units per second, and the work one request of each class
    brings (planner: plans of the measured size; decoder: seconds of one pod)."""

    name: str
    curve: Curve
    work: dict[str, float]

    def mean_work(self, mix: dict[str, float]) -> float:
        return sum(share * self.work[c] for c, share in mix.items())

    def load(self, pods: int, rate: float, mix: dict[str, float]) -> float:
        """The fraction of the pods' full rate that `rate` requests/s use."""
        return rate * self.mean_work(mix) / (pods * self.curve.max_rate)

    def occupancy(self, pods: int, rate: float, mix: dict[str, float]) -> list[float]:
        """P(n requests in the stage: running on its pods or waiting for one at the gateway), n = 0, 1, ...
        Poisson arrivals at `rate`, completions at pods x curve(n / pods) / mean work: a birth-death
        chain, whose stationary distribution is a running product. Empty when the stage cannot keep up."""
        if self.load(pods, rate, mix) >= 1:
            return []
        mean = self.mean_work(mix)
        logs, log, top, n = [0.0], 0.0, 0.0, 0
        # in logs (large fleets overflow floats); past pods x max_batch the terms fall geometrically
        while n < pods * self.curve.max_batch or log > top - 30:
            n += 1
            log += math.log(rate * mean / (pods * self.curve(n / pods)))
            logs.append(log)
            top = max(top, log)
        weights = [math.exp(v - top) for v in logs]
        total = sum(weights)
        return [w / total for w in weights]

    def time(self, pods: int, mix: dict[str, float], n: int, cls: str) -> float:
        """Seconds in the stage for a request of class `cls` that finds n others there: it waits for
        the ones beyond what the pods run at once to leave (at the full rate), then runs at the
        per-request speed of the batch it joins (a decoder: alone, its own work)."""
        full = pods * self.curve.max_batch
        waiting = max(0.0, n + 1 - full) * self.mean_work(mix) / (pods * self.curve.max_rate)
        batch = min((n + 1) / pods, self.curve.max_batch)
        return waiting + batch / self.curve(batch) * self.work[cls]

    def idle_time(self, cls: str) -> float:
        """Seconds in the stage with no one else there (the least any number of pods gives)."""
        batch, rate = self.curve.points[0]
        return batch / rate * self.work[cls]


def _cdf(tables: list[tuple[list[float], list[float]]], t: float) -> float:
    """P(sum of the stages' times <= t), each stage a (sorted times, cumulative probabilities) table."""
    times, cumulative = tables[0]
    if len(tables) == 1:
        i = bisect.bisect_right(times, t)
        return cumulative[i - 1] if i else 0.0
    total, before = 0.0, 0.0
    for time, c in zip(times, cumulative, strict=True):
        if time > t:
            break
        total += (c - before) * _cdf(tables[1:], t - time)
        before = c
    return total


@dataclass(frozen=True)
class Prediction:
    mean_s: float
    p50_s: float
    p95_s: float
    p99_s: float


def predict(stages: list[Stage], pods: dict[str, int], rate: float, mix: dict[str, float]) -> Prediction:
    """End-to-end latency: a request's class drawn from the mix, the state it finds in each stage drawn
    from that stage's occupancy (independent stages, as in a tandem of queues fed by Poisson arrivals)."""
    occupancies = [s.occupancy(pods[s.name], rate, mix) for s in stages]
    if not all(occupancies):
        return Prediction(math.inf, math.inf, math.inf, math.inf)
    # class -> one (sorted times, cumulative probabilities) per stage
    tables: dict[str, list[tuple[list[float], list[float]]]] = {}
    mean = 0.0
    for cls, share in mix.items():
        tables[cls] = []
        for stage, occupancy in zip(stages, occupancies, strict=True):
            # sorted: a measured curve may gain more than linearly somewhere, so time need not grow with n
            pairs = sorted((stage.time(pods[stage.name], mix, n, cls), p) for n, p in enumerate(occupancy))
            tables[cls].append(([t for t, _ in pairs], list(itertools.accumulate(p for _, p in pairs))))
            mean += share * sum(p * t for t, p in pairs)

    def quantile(q: float) -> float:
        low = 0.0
        high = max(sum(times[-1] for times, _ in per_stage) for per_stage in tables.values())
        for _ in range(50):  # bisection on P(latency <= t) = q
            middle = (low + high) / 2
            if sum(share * _cdf(tables[cls], middle) for cls, share in mix.items()) >= q:
                high = middle
            else:
                low = middle
        return high

    return Prediction(mean, quantile(0.5), quantile(0.95), quantile(0.99))


def _quantile(values: list[tuple[float, float]], q: float) -> float:
    """The q-quantile of a discrete distribution given as (value, probability) pairs."""
    covered = 0.0
    for value, probability in sorted(values):
        covered += probability
        if covered >= q - 1e-9:
            return value
    raise ValueError("probabilities sum to less than q")


def size(stages: list[Stage], rate: float, mix: dict[str, float], p95_s: float) -> dict[str, int]:
    """Fewest pods whose predicted p95 meets the target: from the fewest that keep up, one pod at a
    time where it shortens the p95 most (every pod costs one GPU)."""
    floor = _quantile([(sum(s.idle_time(cls) for s in stages), share) for cls, share in mix.items()], 0.95)
    if floor >= p95_s:
        raise ValueError(f"a p95 of {p95_s:g} s cannot be met: even idle pods take {floor:.1f} s")
    pods = {s.name: math.floor(rate * s.mean_work(mix) / s.curve.max_rate) + 1 for s in stages}
    while (p95 := predict(stages, pods, rate, mix).p95_s) > p95_s:
        candidates = {s.name: predict(stages, {**pods, s.name: pods[s.name] + 1}, rate, mix).p95_s for s in stages}
        best = min(candidates, key=candidates.__getitem__)
        if candidates[best] >= p95:  # a planner curve that gains more than linearly with batch
            raise ValueError(f"a p95 of {p95_s:g} s cannot be met: it stops improving at {p95:.1f} s")
        pods[best] += 1
    return pods


def mean_in_stage(stage: Stage, pods: int, rate: float, mix: dict[str, float]) -> float:
    """Requests in the stage on average (running or waiting): what its autoscaler sees."""
    return sum(n * p for n, p in enumerate(stage.occupancy(pods, rate, mix)))


def _pairs(text: str) -> list[tuple[str, float]]:
    """'a:1,b:2' -> [('a', 1.0), ('b', 2.0)]."""
    try:
        return [(key, float(value)) for key, value in (item.rsplit(":", 1) for item in text.split(",") if item)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY:NUMBER[,KEY:NUMBER...], got {text!r}") from None


def add_rate_arguments(parser: argparse.ArgumentParser) -> None:
    """The per-stage rates and the mix (shared with benchmarks/fleet_sim.py)."""
    parser.add_argument("--planner", type=_pairs, default=[], help="B:PLANS_PER_S of one planner pod, comma-separated")
    parser.add_argument("--planner-seconds", type=_pairs, default=[], help="B:SECONDS one plan takes with B at once")
    parser.add_argument("--planner-size", default="", help="WIDTHxHEIGHT of the plans the planner rates are for")
    parser.add_argument("--decoder", type=_pairs, default=[], help="CLASS:IMAGES_PER_S of one decoder pod")
    parser.add_argument("--decoder-seconds", type=_pairs, default=[], help="CLASS:SECONDS per image of one decoder")
    parser.add_argument("--from-json", action="append", default=[], metavar="FILE",
                        help="output of benchmarks/cluster_throughput.py --json (repeatable: one planner point each)")  # fmt: skip
    parser.add_argument("--mix", type=_pairs, default=[], help="CLASS:SHARE, comma-separated (default: the one class)")


def stages_from_args(args: argparse.Namespace) -> tuple[list[Stage], dict[str, float]]:
    """The planner and decoder stages and the normalised mix, from flags and cluster_throughput JSON."""
    planner = {float(b): r for b, r in args.planner} | {float(b): float(b) / s for b, s in args.planner_seconds}
    decoder = dict(args.decoder) | {c: 1 / s for c, s in args.decoder_seconds}
    planner_size = args.planner_size
    for path in args.from_json:
        with open(path) as f:
            run = json.load(f)
        # closed loop at concurrency C over P planners: each planner generates ~C / P plans at once
        planner[run["concurrency"] / run["planners"]] = run["planner_only_plans_per_s"] / run["planners"]
        decoder[f"{run['size']}@{run['steps']}"] = run["decoder_only_images_per_s"]
        if planner_size and planner_size != run["size"]:
            raise SystemExit(f"{path}: planner rates for {run['size']}, others for {planner_size}")
        planner_size = run["size"]
    if not planner or not decoder or not planner_size:
        raise SystemExit("give planner rates (--planner or --planner-seconds, with --planner-size) and decoder "
                         "rates (--decoder or --decoder-seconds), or --from-json")  # fmt: skip
    mix = dict(args.mix) or ({next(iter(decoder)): 1.0} if len(decoder) == 1 else {})
    if not mix:
        raise SystemExit("several decoder classes: give the --mix")
    total = sum(mix.values())
    mix = {cls: share / total for cls, share in mix.items()}

    ref_width, ref_height = (int(v) for v in planner_size.lower().split("x"))
    planner_work, decoder_work = {}, {}
    for cls in mix:
        width, height, steps = parse_class(cls)
        planner_work[cls] = plan_tokens(width, height) / plan_tokens(ref_width, ref_height)
        # the DiT's time is per step: the same size measured at other steps scales
        same_size = [(parse_class(c)[2], r) for c, r in decoder.items() if parse_class(c)[:2] == (width, height)]
        if not same_size:
            raise SystemExit(f"no decoder rate for {width}x{height}")
        measured_steps, images_per_s = same_size[0]
        decoder_work[cls] = steps / measured_steps / images_per_s
    stages = [
        Stage("planner", Curve(tuple(sorted(planner.items()))), planner_work),
        Stage("decoder", Curve(((1, 1.0),)), decoder_work),  # one image at a time: work in seconds
    ]
    return stages, mix


def helm_values(stages: list[Stage], pods: dict[str, int], low: dict[str, int], rate: float,
                mix: dict[str, float]) -> str:  # fmt: skip
    """The chart's values for these pod counts: replicas, and the KEDA range whose threshold (the mean
    demand per pod at the target rate) keeps `pods` at that rate."""
    lines = []
    for stage in stages:
        count = pods[stage.name]
        threshold = mean_in_stage(stage, count, rate, mix) / count
        lines += [f"{stage.name}:", f"  replicas: {count}", "  autoscaling:", f"    minReplicas: {low[stage.name]}",
                  f"    maxReplicas: {count}", f'    threshold: "{threshold:.2f}"']  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--rate", type=float, required=True, help="target images/s")
    parser.add_argument("--p95", type=float, required=True, help="target p95 latency, seconds")
    parser.add_argument("--base-rate", type=float, default=0.0, help="images/s always there: sizes minReplicas")
    add_rate_arguments(parser)
    args = parser.parse_args()
    stages, mix = stages_from_args(args)
    try:
        pods = size(stages, args.rate, mix, args.p95)
        low = size(stages, args.base_rate, mix, args.p95) if args.base_rate else {s.name: 1 for s in stages}
    except ValueError as error:
        raise SystemExit(str(error)) from None
    prediction = predict(stages, pods, args.rate, mix)

    shares = ", ".join(f"{cls} {share:.0%}" for cls, share in mix.items())
    print(f"target: {args.rate:g} images/s, p95 <= {args.p95:g} s, mix {shares}")
    for stage in stages:
        count = pods[stage.name]
        alone = predict([stage], {stage.name: count}, args.rate, mix)
        print(f"{stage.name}: {count} pod{'s' * (count != 1)}, at {stage.load(count, args.rate, mix):.0%} of full rate, "
              f"{mean_in_stage(stage, count, args.rate, mix) / count:.2f} requests per pod, "
              f"mean {alone.mean_s:.2f} s, p95 {alone.p95_s:.2f} s in the stage")  # fmt: skip
    planners, decoders = pods["planner"], pods["decoder"]
    print(f"planner:decoder = {planners}:{decoders} (1:{decoders / planners:.2f})")
    print(f"predicted latency: mean {prediction.mean_s:.2f} s, p50 {prediction.p50_s:.2f} s, "
          f"p95 {prediction.p95_s:.2f} s, p99 {prediction.p99_s:.2f} s")  # fmt: skip
    print(f"Helm values (minReplicas for {args.base_rate:g} images/s):")
    print(helm_values(stages, pods, low, args.rate, mix))


if __name__ == "__main__":
    main()
