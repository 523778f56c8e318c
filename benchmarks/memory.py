"""Memory per stage of GLM-Image at its real shapes, at 1024x1024 and 2048x2048.

Weights, KV cache, activations and peaks of the planner (AR) and the decoder (DiT, VAE, glyph T5).

Computed: from the real configs (testkit.real_shape) at full depth, weights in --dtype.
Measured: random weights of the real widths at reduced depths (built by testkit.real_shape into
--cache-dir), each stage in a fresh process through the services' own code: the planner's load
(as its transformers engine loads) and one plan's prefill plus --decode-steps decode steps; the
decoder engine's load, glyph encoding, one DiT step with CFG and the VAE decode. The peak of each
phase is resident memory on CPU (VmHWM, reset between phases; weights made resident after load)
and the allocator's peak on CUDA; it is extrapolated to full depth by adding the computed size of
the layers the measured model lacks.

    .venv/bin/python benchmarks/memory.py [--device cpu|cuda] [--depths 1,2] [--measure-sides 1024]
        [--max-num-seqs 64] [--decode-steps 32]

On an idle 2-core CPU the default run takes about 3.5 minutes (most of it the 1024x1024 VAE decode in
bf16) and at most about 8 GiB of memory; `--device cuda --depths 40` measures the full model on a GPU.
"""

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import GlmImageForConditionalGeneration, GlmImageProcessor

from decoder_service.diffusers_engine import DiffusersEngine
from decoder_service.domain import DecodeJob
from planner_service.inputs import build_inputs
from planner_service.vllm_engine import CONDITION_PREFIXES  # the ViT + VQ, for condition images
from testkit import real_shape

GIB = 2**30
SIDES = (1024, 2048)
PROMPT = "a poster that says 'HELLO'"
# zai-org/GLM-Image README: the whole diffusers pipeline on one H100, 50 steps (GB = 1e9 bytes).
PUBLISHED_PEAK_GB = {1024: 37.8, 2048: 45.1}
FULL_DEPTHS = {
    "ar": real_shape.TEXT_CONFIG["num_hidden_layers"],
    "vision": real_shape.VISION_CONFIG["depth"],
    "dit": real_shape.DIT_CONFIG["num_layers"],
}


def depths(depth: int) -> dict[str, int]:
    """A model `depth` layers deep, capped at each network's real depth."""
    return {name: min(depth, full) for name, full in FULL_DEPTHS.items()}


# -- computed -----------------------------------------------------------------------------------


def layer_parameters() -> dict[str, int]:
    return {
        "ar": real_shape.ar_layer_parameters(),
        "vision": real_shape.vision_layer_parameters(),
        "dit": real_shape.dit_layer_parameters(),
    }


def kv_bytes_per_token(layers: int, dtype_bytes: int) -> int:
    """K and V of every layer: layers x kv_heads x head_dim x 2 values per token."""
    text = real_shape.TEXT_CONFIG
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return layers * text["num_key_value_heads"] * head_dim * 2 * dtype_bytes


def parameter_counts() -> dict[str, int]:
    """Every network at full depth, counted on the meta device (no memory)."""
    models = real_shape.build_models(**{f"{k}_layers": v for k, v in FULL_DEPTHS.items()}, device="meta")
    ar = dict(models["vision_language_encoder"].named_parameters())
    condition = sum(p.numel() for name, p in ar.items() if name.startswith(CONDITION_PREFIXES))
    return {
        "text decoder": sum(p.numel() for p in ar.values()) - condition,
        "ViT + VQ": condition,
        "DiT": sum(p.numel() for p in models["transformer"].parameters()),
        "glyph T5 encoder": sum(p.numel() for p in models["text_encoder"].parameters()),
        "VAE": sum(p.numel() for p in models["vae"].parameters()),
    }


def plan_layouts(prompt: str) -> dict[int, object]:
    """The planner's own layout of a text-to-image plan per side (the prompt's tokens through the
    chat template, the grids), with the real-shape processor."""
    processor = real_shape.build_processor()
    return {side: build_inputs(processor, prompt, side, side, [])[1] for side in SIDES}


def context_tokens(layout) -> int:
    """What a whole plan holds in the KV cache: the prompt, the preview and target grids, the end slot."""
    return layout.prompt_tokens + layout.total_tokens + 1


def dit_activation_bytes(side: int, dtype_bytes: int) -> int:
    """Main tensors of one DiT block over T image tokens of width D: the residual, its normed input
    and the MLP's 4D-wide hidden before and after GELU = 10 x T x D values (the attention's q, k, v
    and output, 6 x T x D, are smaller; SDPA keeps no T x T matrix)."""
    dit = real_shape.DIT_CONFIG
    tokens = (side // (8 * dit["patch_size"])) ** 2  # VAE /8, then patches of 2 x 2
    return 10 * tokens * dit["num_attention_heads"] * dit["attention_head_dim"] * dtype_bytes


def vae_activation_bytes(side: int, dtype_bytes: int) -> int:
    """The VAE decoder's largest live set: three full-resolution maps of block_out_channels[1]
    channels (the last up block's input, its first GroupNorm's output and that one's SiLU)."""
    return 3 * real_shape.VAE_CONFIG["block_out_channels"][1] * side * side * dtype_bytes


# -- measured (in a child process per stage) ----------------------------------------------------


class Meter:
    """Peak memory of each phase: resident host memory (VmHWM, reset through /proc/self/clear_refs)
    and, on CUDA, the caching allocator's peak of allocated bytes."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.phases: dict[str, dict] = {}

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def _now(self) -> dict:
        now = {"host": self._status("VmRSS")}
        if self.cuda:
            now["device"] = torch.cuda.memory_allocated()
        return now

    @contextlib.contextmanager
    def phase(self, name: str):
        before = self._now()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        peak = {"host": self._status("VmHWM")}
        if self.cuda:
            peak["device"] = torch.cuda.max_memory_allocated()
        self.phases[name] = {"before": before, "peak": peak, "seconds": time.perf_counter() - started}


@torch.no_grad()
def _make_resident(*modules: torch.nn.Module) -> None:
    """Read every weight once: loaders map the safetensors files, and a page counts only once read."""
    for module in modules:
        for parameter in module.parameters():
            parameter.sum()


@torch.inference_mode()
def measure_planner(model_dir: Path, device: str, sides: list[int], decode_steps: int) -> dict:
    meter = Meter(device)
    with meter.phase("load"):
        processor = GlmImageProcessor.from_pretrained(model_dir / "processor")
        # as planner_service's transformers engine loads it
        model = GlmImageForConditionalGeneration.from_pretrained(model_dir / "vision_language_encoder", dtype="auto")
        model = model.to(device).eval()
        _make_resident(model)
    tokens = {}
    for side in sides:
        inputs, layout = build_inputs(processor, PROMPT, side, side, [])
        with meter.phase(f"plan {side}"):
            model.generate(**inputs.to(device), max_new_tokens=decode_steps, do_sample=False)
        tokens[side] = layout.prompt_tokens + decode_steps
    return {"phases": meter.phases, "kv_tokens": tokens}


def measure_decoder(model_dir: Path, device: str, sides: list[int], dtype: str, vae: bool) -> dict:
    meter = Meter(device)
    engine = DiffusersEngine(model_dir, device=device, dtype=dtype)
    with meter.phase("load"):
        engine.load()
        _make_resident(engine.pipe.transformer, engine.pipe.text_encoder, engine.pipe.vae)
    codebook = engine.info.codebook_size
    for side in sides:
        job = DecodeJob(
            request_id=f"memory-{side}", prompt=PROMPT, width=side, height=side, seed=0, steps=1,
            guidance_scale=1.5, condition_images=(),
        )  # fmt: skip
        with meter.phase(f"glyph encoding {side}"):
            request = engine.prepare(job, [])
        with meter.phase(f"DiT step, CFG {side}"):
            engine.begin(request, [i % codebook for i in range((side // 32) ** 2)])
            engine.step(request)
        if vae:
            with meter.phase(f"VAE decode {side}"):
                engine.finish(request)
        engine.release(request)
    return {"phases": meter.phases}


def _child(spec: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{spec['stage']} measurement failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the report ---------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def report_computed(layouts: dict, dtype_bytes: int, max_num_seqs: int) -> None:
    def row(stage: str, what: str, values: dict[int, float] | float) -> None:
        values = values if isinstance(values, dict) else dict.fromkeys(SIDES, values)
        print(f"{stage:8} {what:56}" + "".join(f"{gib(values[side]):>12}" for side in SIDES))

    counts = parameter_counts()
    weights = {name: count * dtype_bytes for name, count in counts.items()}
    kv = kv_bytes_per_token(FULL_DEPTHS["ar"], dtype_bytes)
    one_plan = {side: kv * context_tokens(layouts[side]) for side in SIDES}
    print(f"\nCOMPUTED from the configs, full depth{'':28}" + "".join(f"{s}x{s}".rjust(12) for s in SIDES))
    for name in ("text decoder", "ViT + VQ"):
        row("planner", f"weights: {name} ({counts[name] / 1e9:.2f}e9 parameters)", weights[name])
    row("planner", f"KV cache, one plan ({kv // 1024} KiB per token)", one_plan)
    row("planner", f"KV cache, {max_num_seqs} plans at once", {s: max_num_seqs * one_plan[s] for s in SIDES})
    planner = weights["text decoder"] + weights["ViT + VQ"]
    row("planner", f"weights + KV of {max_num_seqs} plans", {s: planner + max_num_seqs * one_plan[s] for s in SIDES})
    for name in ("DiT", "glyph T5 encoder", "VAE"):
        row("decoder", f"weights: {name} ({counts[name] / 1e9:.2f}e9 parameters)", weights[name])
    dit = {side: dit_activation_bytes(side, dtype_bytes) for side in SIDES}
    vae = {side: vae_activation_bytes(side, dtype_bytes) for side in SIDES}
    row("decoder", "DiT activations, one pass (10 x T x D)", dit)
    row("decoder", "VAE decode activations (3 maps of 512 ch, full size)", vae)
    decoder = weights["DiT"] + weights["glyph T5 encoder"] + weights["VAE"]
    row("decoder", "weights + the larger activations", {s: decoder + max(dit[s], vae[s]) for s in SIDES})
    print(
        "published, zai-org README (the whole pipeline in diffusers on one H100): "
        + ", ".join(f"{s}x{s} {gb} GB = {gb * 1e9 / GIB:.1f} GiB" for s, gb in PUBLISHED_PEAK_GB.items())
        + f"; the weights of both stages computed here: {(planner + decoder) / GIB:.1f} GiB"
    )


def report_measured(args, layouts: dict, dtype_bytes: int, sides: list[int]) -> None:
    layer_bytes = {name: count * dtype_bytes for name, count in layer_parameters().items()}
    full_kv = kv_bytes_per_token(FULL_DEPTHS["ar"], dtype_bytes)
    metric = "host" if args.device == "cpu" else "device"
    print(
        f"\nMEASURED on {args.device}: random weights of the real widths at reduced depth, each stage in its own "
        f"process through the services' code;\n{'peak resident memory' if metric == 'host' else 'peak allocated GPU memory'}"
        " per phase (weights read once after load). 'full depth' adds the computed weights of the layers the "
        f"measured model lacks\n(per layer: AR {gib(layer_bytes['ar']).strip()}, ViT {gib(layer_bytes['vision']).strip()}, "
        f"DiT {gib(layer_bytes['dit']).strip()} GiB) and, to a plan, the KV cache of the whole plan at full depth."
    )
    print(
        f"{'stage':8} {'phase':22} {'layers AR/ViT/DiT':>18} {'before':>8} {'peak':>8} {'seconds':>8} {'full depth':>11}"
    )
    loads = {"planner": [], "decoder": []}
    for index, depth in enumerate(int(d) for d in args.depths.split(",")):
        layers = depths(depth)
        model_dir = Path(args.cache_dir) / f"d{depth}-{args.dtype}"
        command = [
            sys.executable, "-m", "testkit.real_shape", str(model_dir), "--ar-layers", str(layers["ar"]),
            "--vision-layers", str(layers["vision"]), "--dit-layers", str(layers["dit"]), "--dtype", args.dtype,
            "--device", args.device,
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        spec = {"model_dir": str(model_dir), "device": args.device, "sides": sides, "dtype": args.dtype}
        planner = _child({**spec, "stage": "planner", "decode_steps": args.decode_steps})
        decoder = _child({**spec, "stage": "decoder", "vae": index == 0})  # the VAE does not depend on depth
        missing = {name: (FULL_DEPTHS[name] - layers[name]) * layer_bytes[name] for name in FULL_DEPTHS}
        for stage, result in (("planner", planner), ("decoder", decoder)):
            for phase, values in result["phases"].items():
                added = missing["ar"] + missing["vision"] if stage == "planner" else missing["dit"]
                if phase.startswith("plan "):
                    side = int(phase.split()[1])
                    measured_kv = kv_bytes_per_token(layers["ar"], dtype_bytes) * result["kv_tokens"][str(side)]
                    added += full_kv * context_tokens(layouts[side]) - measured_kv
                before, peak = values["before"][metric], values["peak"][metric]
                print(
                    f"{stage:8} {phase:22} {'/'.join(str(layers[n]) for n in FULL_DEPTHS):>18} {gib(before)} "
                    f"{gib(peak)} {values['seconds']:8.1f} {gib(peak + added):>11}"
                )
            loads[stage].append((layers, result["phases"]["load"]["peak"][metric]))
    if len(loads["planner"]) > 1:
        (low, planner_low), (high, planner_high) = loads["planner"][0], loads["planner"][-1]
        decoder_low, decoder_high = loads["decoder"][0][1], loads["decoder"][-1][1]
        planner_added = sum((high[n] - low[n]) * layer_bytes[n] for n in ("ar", "vision"))
        decoder_added = (high["dit"] - low["dit"]) * layer_bytes["dit"]
        print(
            "the extrapolation checked, load peak from the first depth to the last: "
            f"planner +{gib(planner_high - planner_low).strip()} GiB measured, +{gib(planner_added).strip()} computed; "
            f"decoder +{gib(decoder_high - decoder_low).strip()} GiB measured, +{gib(decoder_added).strip()} computed"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(real_shape.DTYPES))
    parser.add_argument("--depths", default="1,2", help="measured depths (layers per network, capped at the real)")
    parser.add_argument(
        "--measure-sides", default="", help="square sizes measured; default 1024 (cpu), 1024,2048 (cuda)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64, help="plans the planner holds at once (vLLM flag)")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--cache-dir", default=".cache/real-shape")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one stage's measurement, in a process of its own
        spec = json.loads(args.child)
        model_dir, sides = Path(spec["model_dir"]), spec["sides"]
        if spec["stage"] == "planner":
            result = measure_planner(model_dir, spec["device"], sides, spec["decode_steps"])
        else:
            result = measure_decoder(model_dir, spec["device"], sides, spec["dtype"], spec["vae"])
        print(json.dumps(result))
        return

    dtype_bytes = real_shape.DTYPES[args.dtype].itemsize
    sides = [int(s) for s in (args.measure_sides or ("1024,2048" if args.device == "cuda" else "1024")).split(",")]
    layouts = plan_layouts(PROMPT)
    print(
        f"GLM-Image memory per stage, {args.dtype} weights, GiB = 2^30 bytes. Full depth: AR {FULL_DEPTHS['ar']} "
        f"layers + ViT {FULL_DEPTHS['vision']}, DiT {FULL_DEPTHS['dit']}.\nPrompt {PROMPT!r}: "
        + ", ".join(
            f"{s}x{s} {layouts[s].prompt_tokens} prompt + {layouts[s].total_tokens + 1} plan tokens" for s in SIDES
        )
        + "; T = image tokens of the DiT, D = its width."
    )
    report_computed(layouts, dtype_bytes, args.max_num_seqs)
    report_measured(args, layouts, dtype_bytes, sides)


if __name__ == "__main__":
    main()
