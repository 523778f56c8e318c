"""Plan throughput and time to first token: the vLLM engine against the transformers engine.

    python benchmarks/planner_engines.py [--model DIR] [--size 512x512] [--concurrency 1 8] [--plans 8]
                                         [--vllm-args "VLLM FLAGS"]

Both engines run in this process behind the planner's engine interface (prepare + generate), on the
same model and machine, one after the other; vLLM runs as in production (its engine core and model
worker in spawned processes). Each plan is sampled with the checkpoint's generation config and its
own seed. At concurrency C, C plans are submitted at once and kept in flight until --plans are done.
Prints plan tokens/s, the median and worst time to first token, and vLLM's throughput ratio.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from planner_service.engine import PlanEngine, PlanJob, Sampling  # noqa: E402

PROMPT = "a poster that says 'HELLO', in warm colours"


@dataclass
class Result:
    engine: str
    concurrency: int
    plans: int
    tokens: int
    seconds: float
    first_token: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


async def one_plan(engine: PlanEngine, index: int, width: int, height: int) -> tuple[int, float]:
    job = PlanJob(f"bench-{index}", PROMPT, width, height, seed=1000 + index, sampling=Sampling())
    submitted = time.perf_counter()
    layout = await engine.prepare(job)
    first, tokens = None, 0
    async for ids in engine.generate(job, layout):
        first = first or time.perf_counter() - submitted
        tokens += len(ids)
    assert tokens == layout.total_tokens, (tokens, layout.total_tokens)
    return tokens, first


async def run(engine: PlanEngine, concurrency: int, plans: int, width: int, height: int) -> Result:
    slots = asyncio.Semaphore(concurrency)

    async def limited(index: int):
        async with slots:
            return await one_plan(engine, index, width, height)

    started = time.perf_counter()
    done = await asyncio.gather(*(limited(i) for i in range(plans)))
    seconds = time.perf_counter() - started
    return Result(engine.name, concurrency, plans, sum(t for t, _ in done), seconds, [f for _, f in done])


def make(name: str, model_dir: str, vllm_args: list[str]) -> PlanEngine:
    if name == "vllm":
        from planner_service.vllm_engine import VllmEngine

        return VllmEngine(model_dir, vllm_args)
    from planner_service.transformers_engine import TransformersEngine

    return TransformersEngine(model_dir)


async def bench(name: str, args) -> list[Result]:
    width, height = args.size
    engine = make(name, args.model, args.vllm_args.split())
    loaded = time.perf_counter()
    await engine.start()
    print(f"{name}: started in {time.perf_counter() - loaded:.1f} s", flush=True)
    try:
        await run(engine, 1, 1, width, height)  # warm-up
        results = []
        for concurrency in args.concurrency:
            plans = max(args.plans, concurrency)
            result = await run(engine, concurrency, plans, width, height)
            print(f"{name}: concurrency {concurrency}: {result.tokens_per_second:.0f} tokens/s", flush=True)
            results.append(result)
        return results
    finally:
        await engine.shutdown()


def report(results: list[Result], args) -> None:
    width, height = args.size
    print(f"\nplans of {width}x{height}, sampled, {os.cpu_count()} CPUs")
    print(
        f"{'engine':<13} {'concurrency':>11} {'plans':>6} {'tokens':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT max':>9}"
    )
    by_key = {}
    for r in results:
        by_key[(r.engine, r.concurrency)] = r
        print(
            f"{r.engine:<13} {r.concurrency:>11} {r.plans:>6} {r.tokens:>7} {r.tokens_per_second:>9.0f} "
            f"{statistics.median(r.first_token) * 1000:>7.0f}ms {max(r.first_token) * 1000:>7.0f}ms"
        )
    for concurrency in args.concurrency:
        vllm, reference = by_key.get(("vllm", concurrency)), by_key.get(("transformers", concurrency))
        if vllm and reference:
            ratio = vllm.tokens_per_second / reference.tokens_per_second
            print(f"concurrency {concurrency}: vllm / transformers throughput = {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("MODEL_DIR", str(REPO / ".cache" / "tiny-glm-image")))
    parser.add_argument("--size", default="512x512", type=lambda s: tuple(int(v) for v in s.split("x")))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--plans", type=int, default=8, help="plans per concurrency level (at least the concurrency)")
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm"], choices=["transformers", "vllm"])
    parser.add_argument(
        "--vllm-args", default="", help="vLLM engine flags for the vLLM engine, e.g. '--max-num-seqs 16'"
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))
    if not Path(args.model, "model_index.json").exists():
        from testkit.tiny_model import write_tiny_model

        write_tiny_model(args.model)
    results = []
    for name in args.engines:
        results += asyncio.run(bench(name, args))
    report(results, args)


if __name__ == "__main__":
    main()
