"""Command-line client.

python -m gateway.cli generate "a poster that says 'HELLO'" --size 512x512 --seed 7 --out image.png
python -m gateway.cli info
"""

import argparse
import sys
import time

import grpc
from tqdm import tqdm

from gateway.client import FORMATS, ImageClient, error_details
from glmimage.v1 import common_pb2

STAGE_NAMES = {common_pb2.STAGE_PLANNING: "planning", common_pb2.STAGE_DECODING: "denoising"}
UNITS = {common_pb2.STAGE_PLANNING: "tok", common_pb2.STAGE_DECODING: "step"}


class ProgressBars:
    """One bar per stage on stderr (planning tokens, then denoising steps), drawn by tqdm: live on a
    terminal, nothing in a log file or pipe (no carriage-return spam)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.stage = None
        self.bar: tqdm | None = None

    def __call__(self, stage: int, done: int, total: int) -> None:
        if stage != self.stage or self.bar is None:
            self.finish()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{STAGE_NAMES.get(stage, 'stage'):>9}", unit=UNITS.get(stage, "it"),
                            file=self.stream, disable=None, leave=True)  # fmt: skip
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return width, height


def generate(args) -> int:
    width, height = args.size
    condition_images = [open(path, "rb").read() for path in args.image]
    bars = ProgressBars()
    started = time.perf_counter()
    with ImageClient(args.address) as client:
        try:
            result = client.generate(
                args.prompt, width, height, seed=args.seed, num_inference_steps=args.steps,
                guidance_scale=args.guidance, temperature=args.temperature, condition_images=condition_images,
                output_format=args.format, timeout=args.timeout, on_progress=bars,
            )  # fmt: skip
        except grpc.RpcError as error:
            bars.finish()
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            for line in error_details(error).lines():
                print(f"  {line}", file=sys.stderr)
            return 1
    bars.finish()
    with open(args.out, "wb") as out:
        out.write(result.image)
    done = result.completed
    t = done.timings
    print(
        f"{args.out}: {done.width}x{done.height} {FORMAT_NAMES[done.format]}, seed {done.seed}, "
        f"{done.plan_tokens} plan tokens, request {done.request_id}\n"
        f"first plan token {t.first_plan_token_seconds:.2f} s, plan {t.planning_seconds:.2f} s, "
        f"denoise {t.denoising_seconds:.2f} s, VAE {t.vae_decode_seconds:.2f} s, "
        f"total {t.total_seconds:.2f} s (client {time.perf_counter() - started:.2f} s)"
    )
    return 0


FORMAT_NAMES = {value: name.upper() for name, value in FORMATS.items()}


def info(args) -> int:
    with ImageClient(args.address) as client:
        print(client.server_info())
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="GLM-Image Serve client")
    parser.add_argument("--address", default="127.0.0.1:50050", help="gateway address")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate one image")
    gen.add_argument("prompt")
    gen.add_argument("--size", type=parse_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int, help="denoising steps (default: the decoder's)")
    gen.add_argument("--guidance", type=float, help="CFG scale (default: the decoder's)")
    gen.add_argument("--temperature", type=float, help="plan sampling temperature (0 = greedy)")
    gen.add_argument("--image", action="append", default=[], help="condition image file (repeatable)")
    gen.add_argument("--format", choices=sorted(FORMATS), default="png")
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    gen.add_argument("--out", default="image.png")
    gen.set_defaults(run=generate)
    commands.add_parser("info", help="show the gateway's and the stages' server info").set_defaults(run=info)
    args = parser.parse_args()
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
