"""The GPU kit: GLM-Image at its real shapes (random weights) on one GPU, split vs monolithic, one table.

1. builds the model with testkit.real_shape (full depth, bf16, on the GPU) in the real folder layout;
2. starts the planner (transformers engine) and the decoder as services on the GPU, and the gateway;
   measures DiT seconds per step at each size (the decoder service, a random plan of the size's
   grid), then one request end to end through the gateway: its latency and the planner's tokens/s;
3. stops them and runs the monolithic diffusers pipeline in this process: the same request (same
   seed, same steps) end to end, and at each size the decoder's random plan (no AR): its DiT seconds
   per step, and its image against the decoder's, pixel for pixel. (The end-to-end images are not
   compared: on random weights the planner, which samples inside the codebook only, and diffusers'
   AR stage, which also samples the grid's special ids, draw different plans.)
4. prints one table (and writes it with the raw figures to $OUT/gpu-kit.json when OUT is set).
Peak memory is the device's whole use while a phase runs (nvidia's count, every process; on CPU
the services' or this process's resident memory instead).

    benchmarks/gpu/run.sh                    # on the GPU machine: installs the carried wheels, then this
    .venv/bin/python benchmarks/gpu/kit.py --device cpu --dtype float32 --ar-layers 1 --dit-layers 1 \\
        --vision-layers 1 --sizes 256x256,512x256 --steps 2     # the same run, checked on CPU
"""

import argparse
import io
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import torch
from diffusers import GlmImagePipeline
from PIL import Image
from transformers import GlmImageProcessor

from gateway.client import ImageClient
from glmimage.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, planner_pb2
from planner_service.inputs import build_inputs
from testkit import real_shape, reference
from testkit.cluster import Cluster

PROMPT = "a poster that says 'HELLO'"
GIB = 2**30


class PeakMemory:
    """Samples memory in use every 50 ms while a `with` block runs: the whole device on CUDA, the
    resident memory of `pids` (and their children) on CPU."""

    def __init__(self, device: str, pids: list[int]):
        self.device, self.pids, self.peak = device, pids, 0

    def _used(self) -> int:
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            return total - free
        processes = [psutil.Process(pid) for pid in self.pids]
        processes += [child for p in processes for child in p.children(recursive=True)]
        return sum(p.memory_info().rss for p in processes if p.is_running())

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> "PeakMemory":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.split("x"))
    return width, height


def build(args) -> float:
    """The real-shape model in args.model_dir (kept when the same build is already there), in a child
    process so that its device memory is gone before the services load."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "testkit.real_shape", args.model_dir, "--ar-layers", str(args.ar_layers),
         "--dit-layers", str(args.dit_layers), "--vision-layers", str(args.vision_layers), "--dtype", args.dtype,
         "--device", args.device], check=True,
    )  # fmt: skip
    return time.perf_counter() - started


def random_plan(width: int, height: int, preview_tokens: int, codebook: int) -> tuple[list[int], list[int]]:
    """A plan of random codebook ids for the size (target grid, preview grid), the same on each call."""
    rng = random.Random(f"{width}x{height}")
    target = [rng.randrange(codebook) for _ in range((width // 32) * (height // 32))]
    return target, [rng.randrange(codebook) for _ in range(preview_tokens)]


def decode_random_plan(stub, info, processor, width: int, height: int, steps: int) -> tuple[float, bytes]:
    """The decoder service on `random_plan`: DiT seconds per step, and the image."""
    _, layout = build_inputs(processor, PROMPT, width, height, [])
    target, preview = random_plan(width, height, layout.preview_tokens, info.codebook_size)
    header = planner_pb2.PlanHeader(
        request_id=f"kit-{width}x{height}", target_rows=layout.target[0], target_cols=layout.target[1],
        preview_rows=layout.preview[0], preview_cols=layout.preview[1], codebook_size=info.codebook_size,
        plan_format=info.plan_format, seed=0, width=width, height=height,
    )  # fmt: skip
    requests = [
        decoder_pb2.DecodeRequest(spec=decoder_pb2.DecodeSpec(
            request_id=header.request_id, prompt=PROMPT, width=width, height=height, seed=0, num_inference_steps=steps)),
        decoder_pb2.DecodeRequest(plan_chunk=planner_pb2.PlanChunk(header=header)),
        *(decoder_pb2.DecodeRequest(plan_chunk=planner_pb2.PlanChunk(tokens=planner_pb2.PlanTokens(grid=grid, offset=0, ids=ids)))
          for grid, ids in ((planner_pb2.GRID_PREVIEW, preview), (planner_pb2.GRID_TARGET, target))),
        decoder_pb2.DecodeRequest(plan_chunk=planner_pb2.PlanChunk(
            summary=planner_pb2.PlanSummary(finish_reason=planner_pb2.FINISH_REASON_COMPLETE))),
    ]  # fmt: skip
    image = b""
    for event in stub.Decode(iter(requests), timeout=1800):
        if event.WhichOneof("event") == "image_chunk":
            image += event.image_chunk.data
        elif event.WhichOneof("event") == "completed":
            return event.completed.timings.denoising_seconds / steps, image
    raise RuntimeError("the decoder's stream ended without an image")


def split_run(args, sizes, processor) -> dict:
    side = str(max(max(s) for s in sizes))
    limits = ["--min-side", "256", "--max-side", side]
    stage = ["--device", args.device, *limits]
    cluster = Cluster(args.model_dir, engine="transformers", log_dir=Path(args.out_dir) / "logs",
                      stage_args={"planner": stage, "decoder": stage}, gateway_args=limits)  # fmt: skip
    results: dict = {}
    started = time.perf_counter()
    with cluster, ImageClient(cluster.gateway.address) as client:
        results["load_seconds"] = time.perf_counter() - started
        pids = [s.process.pid for s in cluster.services if s is not cluster.gateway]
        with PeakMemory(args.device, pids) as memory:
            channel = grpc.insecure_channel(cluster.pods("decoder")[0].address)
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            info = stub.GetServerInfo(common_pb2.GetServerInfoRequest(), timeout=30)
            decode_random_plan(stub, info, processor, *sizes[0], 1)  # warm-up
            decoded = {f"{w}x{h}": decode_random_plan(stub, info, processor, w, h, args.steps) for w, h in sizes}
            results["dit_step_seconds"] = {key: seconds for key, (seconds, _) in decoded.items()}
            results["decoded"] = {key: image for key, (_, image) in decoded.items()}
            channel.close()
            width, height = sizes[0]  # no warm-up plan: the first token's latency is left out of tokens/s
            started = time.perf_counter()
            result = client.generate(PROMPT, width, height, seed=0, num_inference_steps=args.steps, timeout=1800)
            results["e2e_seconds"] = time.perf_counter() - started
        timings = result.completed.timings
        _, layout = build_inputs(processor, PROMPT, width, height, [])
        decode_seconds = timings.planning_seconds - timings.first_plan_token_seconds
        results["plan_tokens"] = layout.total_tokens
        results["ar_tokens_per_second"] = (layout.total_tokens - 1) / decode_seconds
        results["first_plan_token_seconds"] = timings.first_plan_token_seconds
        results["planning_seconds"] = timings.planning_seconds
        results["peak_bytes"] = memory.peak
    return results


def monolithic_run(args, sizes) -> dict:
    dtype = real_shape.DTYPES[args.dtype]
    results: dict = {}
    with PeakMemory(args.device, [os.getpid()]) as memory:
        started = time.perf_counter()
        pipe = GlmImagePipeline.from_pretrained(args.model_dir, torch_dtype=dtype).to(args.device)
        results["load_seconds"] = time.perf_counter() - started
        width, height = sizes[0]
        codebook = pipe.vision_language_encoder.config.vq_config.num_embeddings
        warm_up_ids = [0] * ((width // 32) * (height // 32))
        reference.render(pipe, PROMPT, width, height, seed=1, steps=1, target_ids=warm_up_ids)  # the DiT and VAE
        started = time.perf_counter()
        reference.render(pipe, PROMPT, width, height, seed=0, steps=args.steps)
        results["e2e_seconds"] = time.perf_counter() - started
        results["dit_step_seconds"], results["decoded"] = {}, {}
        for w, h in sizes:
            stamps: list[float] = []

            def on_step(pipe, step, timestep, kwargs, stamps=stamps):
                stamps.append(time.perf_counter())
                return kwargs

            target, _ = random_plan(w, h, 0, codebook)
            stamps.append(time.perf_counter())
            results["decoded"][f"{w}x{h}"] = reference.render(
                pipe, PROMPT, w, h, seed=0, steps=args.steps, target_ids=target, callback_on_step_end=on_step
            )
            # the median of steps 2..N: the time to the first step's end holds the glyph encoding too
            results["dit_step_seconds"][f"{w}x{h}"] = statistics.median(
                b - a for a, b in itertools.pairwise(stamps[1:])
            )
    results["peak_bytes"] = memory.peak
    return results


def table(args, split: dict, mono: dict, build_seconds: float) -> str:
    width, height = size(args.sizes.split(",")[0])
    rows = [
        ("model", f"real shapes, {args.ar_layers} AR / {args.dit_layers} DiT / {args.vision_layers} ViT layers, "
                  f"{args.dtype}, random weights; {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}", ""),
        ("build and write the model", f"{build_seconds:.0f} s", ""),
        ("load (split: both services ready; monolithic: from_pretrained + to device)",
         f"{split['load_seconds']:.1f} s", f"{mono['load_seconds']:.1f} s"),
    ]  # fmt: skip
    for key in split["dit_step_seconds"]:
        rows.append((f"DiT seconds per step, {key}, CFG", f"{split['dit_step_seconds'][key]:.3f}",
                     f"{mono['dit_step_seconds'][key]:.3f}"))  # fmt: skip
        same = "yes" if split["decoder_equals_pipeline"][key] else "NO"
        rows.append((f"decoder's image pixel-identical to the pipeline's, same plan, {key}", same, ""))
    rows += [
        (f"AR tokens/s, one {width}x{height} plan ({split['plan_tokens']} tokens, transformers engine)",
         f"{split['ar_tokens_per_second']:.1f}", ""),
        ("first plan token", f"{split['first_plan_token_seconds']:.2f} s", ""),
        (f"end to end, {width}x{height}, {args.steps} steps", f"{split['e2e_seconds']:.1f} s", f"{mono['e2e_seconds']:.1f} s"),
        ("peak memory (split: both services)", f"{split['peak_bytes'] / GIB:.1f} GiB", f"{mono['peak_bytes'] / GIB:.1f} GiB"),
    ]  # fmt: skip
    lines = ["| measure | split | monolithic |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=".cache/real-shape/full")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(real_shape.DTYPES))
    parser.add_argument("--ar-layers", type=int, default=real_shape.TEXT_CONFIG["num_hidden_layers"])
    parser.add_argument("--dit-layers", type=int, default=real_shape.DIT_CONFIG["num_layers"])
    parser.add_argument("--vision-layers", type=int, default=real_shape.VISION_CONFIG["depth"])
    parser.add_argument(
        "--sizes", default="1024x1024,2048x2048", help="DiT per-step sizes; the first is also run end to end"
    )
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of every measured request")
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "out/gpu-kit"))
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the per-step time is the median of steps 2 to N)")
    sizes = [size(s) for s in args.sizes.split(",")]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)

    build_seconds = build(args)
    processor = GlmImageProcessor.from_pretrained(f"{args.model_dir}/processor")
    split = split_run(args, sizes, processor)
    print("split:", json.dumps({k: v for k, v in split.items() if k != "decoded"}), flush=True)
    mono = monolithic_run(args, sizes)
    for key in split["decoded"]:
        service = Image.open(io.BytesIO(split["decoded"][key])).convert("RGB").tobytes()
        split.setdefault("decoder_equals_pipeline", {})[key] = service == mono["decoded"][key].convert("RGB").tobytes()
    raw = {
        name: {k: v for k, v in run.items() if k != "decoded"} for name, run in (("split", split), ("monolithic", mono))
    }
    report = table(args, split, mono, build_seconds)
    print(report)
    Path(args.out_dir, "gpu-kit.json").write_text(json.dumps({"table": report, **raw}, indent=1))


if __name__ == "__main__":
    main()
