"""Plan throughput and time to first token: the vLLM engine against the transformers engine, and
against vLLM's own ceiling.

    python benchmarks/planner_engines.py [--model DIR] [--size 512x512] [--concurrency 1 8] [--plans 8]
                                         [--rounds 3] [--engines transformers vllm vllm-plain]
                                         [--vllm-args "VLLM FLAGS"]

Both engines run in this process behind the planner's engine interface (prepare + generate), on the
same model and machine; vLLM runs as in production (its engine core and model worker in spawned
processes). Each plan is sampled with the checkpoint's generation config and its own seed. At
concurrency C, C plans are submitted at once and kept in flight until --plans are done. The engines
take turns, round after round, so that a change in the machine's load hits both; each figure is
the median over the rounds. Prints plan tokens/s, time to first token (median and worst, from
submission), and vLLM's throughput relative to transformers'.

`vllm-plain` is the ceiling: vLLM's own Glm4ForCausalLM (no plugin, linear positions) built from the
checkpoint's text config and weights, its vocabulary cut to the codebook head's (so that its head is
the same matrix), generating the same number of tokens after a prompt of the same length. The
project's engine over it is what GLM-Image's positions, the padded codebook head and the codebook-only
sampling cost on top of vLLM itself.
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
from servekit.validation import Limits  # noqa: E402

PROMPT = "a poster that says 'HELLO', in warm colours"
ENGINES = ("transformers", "vllm", "vllm-plain")


@dataclass
class Run:
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


async def run(engine: PlanEngine, concurrency: int, plans: int, width: int, height: int) -> Run:
    slots = asyncio.Semaphore(concurrency)

    async def limited(index: int):
        async with slots:
            return await one_plan(engine, index, width, height)

    started = time.perf_counter()
    done = await asyncio.gather(*(limited(i) for i in range(plans)))
    return Run(sum(t for t, _ in done), time.perf_counter() - started, [f for _, f in done])


def write_plain_glm4(model_dir: str, out: Path) -> int:
    """The AR's decoder stack as a plain GLM-4 checkpoint: same layers and head, vocabulary = the head's
    (returned)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import Glm4Config, GlmImageConfig

    text = GlmImageConfig.from_pretrained(Path(model_dir, "vision_language_encoder")).text_config
    vocab = text.vision_vocab_size
    rope = dict(text.rope_parameters)
    rope.pop("mrope_section", None)
    config = Glm4Config(
        vocab_size=vocab, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, head_dim=text.hidden_size // text.num_attention_heads,
        max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
        attention_bias=text.attention_bias, rope_parameters=rope, pad_token_id=0, eos_token_id=vocab - 1,
        dtype=text.dtype, architectures=["Glm4ForCausalLM"],
    )  # fmt: skip
    state = {}
    folder = Path(model_dir, "vision_language_encoder")
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                if key.startswith("model.language_model."):
                    state["model." + key.removeprefix("model.language_model.")] = weights.get_tensor(key)
                elif key == "lm_head.weight":
                    state[key] = weights.get_tensor(key)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:vocab].contiguous()
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return vocab


class PlainGlm4Engine(PlanEngine):
    """vLLM's Glm4ForCausalLM behind the planner's engine interface: each job's prompt length and plan
    length as the project's engine would have them, its sampling from the same generation config."""

    name = "vllm-plain"
    default_max_in_flight = 64

    def __init__(self, model_dir: str, vllm_args: list[str]):
        from planner_service.vllm_engine import parse_engine_args

        self.model_dir = model_dir
        self.engine_args = parse_engine_args(model_dir, vllm_args, Limits())
        self.engine_args.model = self.engine_args.tokenizer = str(REPO / ".cache" / "plain-glm4")
        self.engine = None

    async def start(self) -> None:
        from transformers import GenerationConfig, GlmImageProcessor
        from vllm.v1.engine.async_llm import AsyncLLM

        self.vocab = write_plain_glm4(self.model_dir, Path(self.engine_args.model))
        self.processor = GlmImageProcessor.from_pretrained(f"{self.model_dir}/processor")
        self.generation = GenerationConfig.from_pretrained(f"{self.model_dir}/vision_language_encoder")
        self.engine = AsyncLLM.from_engine_args(self.engine_args)
        self.requests = 0

    async def prepare(self, job: PlanJob):
        from planner_service.inputs import build_inputs

        inputs, layout = build_inputs(self.processor, job.prompt, job.width, job.height, [])
        # the same length; any ids inside the cut vocabulary will do
        job.engine_inputs = {"prompt_token_ids": [i % self.vocab for i in inputs["input_ids"][0].tolist()]}
        return layout

    async def generate(self, job: PlanJob, layout):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.requests += 1
        params = SamplingParams(
            temperature=self.generation.temperature, top_p=self.generation.top_p, top_k=self.generation.top_k or 0,
            max_tokens=layout.total_tokens, min_tokens=layout.total_tokens, ignore_eos=True, seed=job.seed,
            output_kind=RequestOutputKind.DELTA, detokenize=False,
        )  # fmt: skip
        async for output in self.engine.generate(job.engine_inputs, params, f"{job.request_id}-{self.requests}"):
            if tokens := list(output.outputs[0].token_ids):
                yield tokens

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


def make(name: str, model_dir: str, vllm_args: list[str]) -> PlanEngine:
    if name == "vllm-plain":
        return PlainGlm4Engine(model_dir, vllm_args)
    if name == "vllm":
        from planner_service.vllm_engine import VllmEngine

        return VllmEngine(model_dir, vllm_args, Limits())
    from planner_service.transformers_engine import TransformersEngine

    return TransformersEngine(model_dir)


async def bench(args) -> dict[tuple[str, int], list[Run]]:
    width, height = args.size
    engines = {}
    try:
        for name in args.engines:
            engine = make(name, args.model, args.vllm_args.split())
            started = time.perf_counter()
            await engine.start()
            engines[name] = engine
            await run(engine, 1, 1, width, height)  # warm-up
            print(f"{name}: started in {time.perf_counter() - started:.1f} s", flush=True)
        runs: dict[tuple[str, int], list[Run]] = {}
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                for name, engine in engines.items():
                    result = await run(engine, concurrency, max(args.plans, concurrency), width, height)
                    runs.setdefault((name, concurrency), []).append(result)
                    print(
                        f"round {round_index + 1}: {name}, concurrency {concurrency}: "
                        f"{result.tokens_per_second:.0f} tokens/s",
                        flush=True,
                    )
        return runs
    finally:
        for engine in engines.values():
            await engine.shutdown()


def report(runs: dict[tuple[str, int], list[Run]], args) -> None:
    width, height = args.size
    print(f"\nplans of {width}x{height}, sampled, {os.cpu_count()} CPUs, median of {args.rounds} rounds")
    print(f"{'engine':<13} {'concurrency':>11} {'plans':>6} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT max':>9}")
    throughput = {}
    for (name, concurrency), results in runs.items():
        throughput[name, concurrency] = statistics.median(r.tokens_per_second for r in results)
        first = statistics.median(statistics.median(r.first_token) for r in results)
        worst = statistics.median(max(r.first_token) for r in results)
        print(
            f"{name:<13} {concurrency:>11} {len(results[0].first_token):>6} {throughput[name, concurrency]:>9.0f} "
            f"{first * 1000:>7.0f}ms {worst * 1000:>7.0f}ms"
        )
    for concurrency in args.concurrency:
        for baseline in ("transformers", "vllm-plain"):
            if ("vllm", concurrency) in throughput and (baseline, concurrency) in throughput:
                ratio = throughput["vllm", concurrency] / throughput[baseline, concurrency]
                print(f"concurrency {concurrency}: vllm / {baseline} throughput = {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("MODEL_DIR", str(REPO / ".cache" / "tiny-glm-image")))
    parser.add_argument("--size", default="512x512", type=lambda s: tuple(int(v) for v in s.split("x")))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--plans", type=int, default=8, help="plans per run (at least the concurrency)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per engine and concurrency; medians are shown")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--vllm-args", default="", help="vLLM engine flags, e.g. '--max-num-seqs 16'")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))
    if not Path(args.model, "model_index.json").exists():
        from testkit.tiny_model import write_tiny_model

        write_tiny_model(args.model)
    report(asyncio.run(bench(args)), args)


if __name__ == "__main__":
    main()
