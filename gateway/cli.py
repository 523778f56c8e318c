"""Command-line client.

python -m gateway.cli generate "a poster that says 'HELLO'" --size 512x512 --seed 7 --out image.png --previews 2
python -m gateway.cli info
"""

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import grpc
from tqdm import tqdm

from gateway.client import FORMATS, ImageClient, Preview, error_details
from glmimage.v1 import common_pb2

STAGE_NAMES = {common_pb2.STAGE_PLANNING: "planning", common_pb2.STAGE_DECODING: "denoising"}
UNITS = {common_pb2.STAGE_PLANNING: "tok", common_pb2.STAGE_DECODING: "step"}


class ProgressBars:
    """One bar per stage on stderr (planning tokens, then denoising steps), drawn by tqdm: live on a
    terminal, nothing in a log file or pipe (no carriage-return spam)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.stage: common_pb2.Stage | None = None
        self.bar: tqdm | None = None

    def __call__(self, stage: common_pb2.Stage, done: int, total: int) -> None:
        if stage != self.stage or self.bar is None:
            self.finish()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{STAGE_NAMES.get(stage, 'stage'):>9}", unit=UNITS.get(stage, "it"),
                            file=self.stream, disable=None, leave=True)  # fmt: skip
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def write(self, line: str) -> None:
        """A line above the bars (tqdm keeps them intact)."""
        tqdm.write(line, file=self.stream)

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


def preview_path(out: str, preview: Preview) -> Path:
    """image.png -> image.preview-0.png (the extension of the preview's own format)."""
    path = Path(out)
    return path.with_name(f"{path.stem}.preview-{preview.index}.{FORMAT_EXTENSIONS[preview.format]}")


class PreviewWriter:
    """Writes each preview next to the output as it arrives and says when it came."""

    def __init__(self, out: str, bars: ProgressBars):
        self.out = out
        self.bars = bars

    def __call__(self, preview: Preview) -> None:
        path = preview_path(self.out, preview)
        path.write_bytes(preview.data)
        kind = "plan preview" if preview.stage == common_pb2.STAGE_PLANNING else "denoising preview"
        self.bars.write(f"{path}: {kind}, {preview.width}x{preview.height}, at {preview.seconds:.2f} s")


def generate(args) -> int:
    width, height = args.size
    condition_images = [open(path, "rb").read() for path in args.image]
    bars = ProgressBars()
    started = time.perf_counter()
    with ImageClient(args.address, api_key=args.api_key) as client:
        try:
            result = client.generate(
                args.prompt, width, height, seed=args.seed, num_inference_steps=args.steps,
                guidance_scale=args.guidance, temperature=args.temperature, condition_images=condition_images,
                output_format=args.format, output_quality=args.quality, previews=args.previews,
                timeout=args.timeout, on_progress=bars, on_preview=PreviewWriter(args.out, bars),
            )  # fmt: skip
        except grpc.RpcError as error:
            bars.finish()
            return failed(error)
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
    if args.previews:
        skipped = " (the others were skipped: no decoder had room for them)" if done.previews < args.previews else ""
        print(f"previews: {done.previews} of {args.previews}{skipped}")
    return 0


FORMAT_NAMES = {value: name.upper() for name, value in FORMATS.items()}
FORMAT_EXTENSIONS = {value: "jpg" if name == "jpeg" else name for name, value in FORMATS.items()}


def failed(error: grpc.RpcError) -> int:
    print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
    for line in error_details(error).lines():
        print(f"  {line}", file=sys.stderr)
    return 1


def info(args) -> int:
    with ImageClient(args.address, api_key=args.api_key) as client:
        try:
            print(client.server_info())
        except grpc.RpcError as error:
            return failed(error)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="GLM-Image Serve client")
    parser.add_argument("--address", default="127.0.0.1:50050", help="gateway address")
    parser.add_argument(
        "--api-key", default=os.environ.get("GLMIMAGE_API_KEY", ""),
        help="the gateway's API key (default: $GLMIMAGE_API_KEY, which keeps it out of the process list)",
    )  # fmt: skip
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
    gen.add_argument("--quality", type=int, help="JPEG/WebP quality, 1-100 (default 95)")
    gen.add_argument(
        "--previews",
        type=int,
        default=0,
        help="preview images to write next to --out as they arrive (OUT.preview-N.EXT)",
    )
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    gen.add_argument("--out", default="image.png")
    gen.set_defaults(run=generate)
    commands.add_parser("info", help="show the gateway's and the stages' server info").set_defaults(run=info)
    args = parser.parse_args()
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
