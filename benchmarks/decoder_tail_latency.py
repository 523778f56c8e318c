"""Decoder tail latency: what the client waits for after the plan's last chunk, with and without the
decoder's preparation overlapped with the plan stream.

    python benchmarks/decoder_tail_latency.py [--model DIR | --address HOST:PORT] [--size 256x256]
        [--steps 4] [--repeats 5] [--plan-seconds 0.5] [--mode t2i|i2i|both]

- overlapped: the spec first, then the header, then the target ids in chunks spread over
  --plan-seconds (as a planner writes them); the decoder prepares meanwhile.
- not overlapped: the same decode with the spec and the whole plan sent together once the plan
  exists, so that nothing can be prepared in advance.
The tail is measured on the client from sending the last plan chunk to receiving `completed`.
Without --address it serves --model (default: the tiny model, MODEL_DIR or .cache/tiny-glm-image)
in this process on a loopback port.
"""

import argparse
import asyncio
import io
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glmimage.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, planner_pb2  # noqa: E402

PROMPT = "a storefront with a sign that says 'GLM IMAGE'"
CHUNKS = 16


def start_local_server(model: str, min_side: int):
    """The decoder on a loopback port, in a background thread with its own event loop; returns a
    function that stops it."""
    from decoder_service.service import make_service
    from decoder_service.settings import DecoderSettings
    from servekit.server import ServerOptions, start_server

    settings = DecoderSettings(model=model, port=0, metrics_port=0, min_side=min_side, max_side=max(min_side, 2048))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def boot():
        options = ServerOptions(host="127.0.0.1", port=0, metrics_port=0, shutdown_grace_seconds=5)
        running = await start_server(make_service(settings), options)
        await running.load()
        return running

    running = asyncio.run_coroutine_threadsafe(boot(), loop).result(600)

    def stop():
        asyncio.run_coroutine_threadsafe(running.stop(5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)

    return f"127.0.0.1:{running.port}", stop


def condition_png(width: int, height: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(1).randint(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Decode:
    """One Decode call; `requests()` records when the last plan chunk leaves."""

    def __init__(self, info, width, height, steps, i2i: bool, overlapped: bool, plan_seconds: float):
        self.info, self.width, self.height, self.steps = info, width, height, steps
        self.i2i, self.overlapped, self.plan_seconds = i2i, overlapped, plan_seconds
        self.last_chunk_at = 0.0

    def _plan(self) -> list[decoder_pb2.DecodeRequest]:
        rows, cols = self.height // 32, self.width // 32
        conditions = []
        if self.i2i:  # a condition image the size of the target: its grid is the target's
            conditions = [
                planner_pb2.ConditionImagePlan(rows=rows, cols=cols, ids=[i % 64 for i in range(rows * cols)])
            ]
        header = planner_pb2.PlanHeader(
            target_rows=rows, target_cols=cols, codebook_size=self.info.codebook_size,
            plan_format=self.info.plan_format, width=self.width, height=self.height, condition_images=conditions,
        )  # fmt: skip
        ids = [(7 * i) % self.info.codebook_size for i in range(rows * cols)]
        step = -(-len(ids) // CHUNKS)
        chunks = [planner_pb2.PlanChunk(header=header)]
        chunks += [
            planner_pb2.PlanChunk(tokens=planner_pb2.PlanTokens(grid=planner_pb2.GRID_TARGET, offset=o, ids=ids[o : o + step]))
            for o in range(0, len(ids), step)
        ]  # fmt: skip
        return [decoder_pb2.DecodeRequest(plan_chunk=chunk) for chunk in chunks]

    def requests(self):
        images = [common_pb2.InputImage(data=condition_png(self.width, self.height))] if self.i2i else []
        spec = decoder_pb2.DecodeSpec(
            prompt=PROMPT, width=self.width, height=self.height, seed=3, num_inference_steps=self.steps,
            condition_images=images,
        )  # fmt: skip
        plan = self._plan()
        if not self.overlapped:
            time.sleep(self.plan_seconds)  # the planner runs first; then spec and plan go together
            yield decoder_pb2.DecodeRequest(spec=spec)
            yield from plan[:-1]
        else:
            yield decoder_pb2.DecodeRequest(spec=spec)
            yield plan[0]  # the header comes before the first token
            for chunk in plan[1:-1]:
                time.sleep(self.plan_seconds / (len(plan) - 1))
                yield chunk
            time.sleep(self.plan_seconds / (len(plan) - 1))
        self.last_chunk_at = time.perf_counter()
        yield plan[-1]

    def run(self, stub) -> tuple[float, common_pb2.Timings]:
        for event in stub.Decode(self.requests(), timeout=600):
            if event.HasField("completed"):
                return time.perf_counter() - self.last_chunk_at, event.completed.timings
        raise RuntimeError("no completed event")


def summarize(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"median {1000 * statistics.median(values):8.1f} ms   p90 {1000 * p90:8.1f} ms"


def bench(stub, info, args, width, height, i2i: bool) -> None:
    Decode(info, width, height, args.steps, i2i, overlapped=True, plan_seconds=0).run(stub)  # warm this shape
    tails = {True: [], False: []}
    timings = {True: [], False: []}
    for _ in range(args.repeats):
        for overlapped in (False, True):  # interleaved, so that background load hits both alike
            tail, server = Decode(info, width, height, args.steps, i2i, overlapped, args.plan_seconds).run(stub)
            tails[overlapped].append(tail)
            timings[overlapped].append(server)
    base, over = statistics.median(tails[False]), statistics.median(tails[True])
    kind = "image-to-image (1 condition image)" if i2i else "text-to-image"
    print(
        f"\n{kind}, {width}x{height}, {args.steps} steps, {args.repeats} repeats, plan streamed over {args.plan_seconds:.2f} s"
    )
    print("  tail = from the last plan chunk sent to `completed` received (client clock)")
    for overlapped, label in (
        (False, "spec and plan sent together (no overlap)"),
        (True, "spec first, plan streamed (overlapped)"),
    ):
        server = timings[overlapped]
        parts = ", ".join(
            f"{name} {1000 * statistics.median(getattr(t, field) for t in server):.1f}"
            for name, field in (
                ("prepare", "decoder_prepare_seconds"), ("denoise", "denoising_seconds"),
                ("vae", "vae_decode_seconds"), ("encode", "encode_seconds"),
            )
        )  # fmt: skip
        print(f"  {label:42s} tail {summarize(tails[overlapped])}   (server medians, ms: {parts})")
    print(f"  saving: {1000 * (base - over):.1f} ms of median tail latency ({100 * (base - over) / base:.1f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--address", help="a running decoder (HOST:PORT)")
    target.add_argument("--model", help="serve this checkpoint in-process (default: the tiny model)")
    parser.add_argument("--size", default="256x256", help="WxH")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plan-seconds", type=float, default=0.5, help="how long the simulated planner writes")
    parser.add_argument("--mode", choices=("t2i", "i2i", "both"), default="both")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    address, stop = args.address, None
    if address is None:
        model = args.model
        if model is None:
            from testkit.tiny_model import write_tiny_model

            model = os.environ.get("MODEL_DIR", str(REPO / ".cache" / "tiny-glm-image"))
            write_tiny_model(model)
        address, stop = start_local_server(model, min_side=min(width, height))
    with grpc.insecure_channel(address) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        info = stub.GetServerInfo(common_pb2.GetServerInfoRequest(), timeout=30)
        print(f"decoder {address}: {info.model} ({info.engine}), plan_format {info.plan_format}")
        for i2i in {"t2i": [False], "i2i": [True], "both": [False, True]}[args.mode]:
            bench(stub, info, args, width, height, i2i)
    if stop is not None:
        stop()


if __name__ == "__main__":
    main()
