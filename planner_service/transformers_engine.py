"""The reference engine: transformers' own `generate`, one plan at a time.

It seeds torch's global generator exactly as diffusers' GlmImagePipeline does, so a sampled plan
is token-for-token the pipeline's own AR stage; it is what the vLLM engine is checked against.
"""

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import GlmImageForConditionalGeneration, GlmImageProcessor, LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from planner_service.engine import PlanEngine, PlanJob, PlanLayout
from planner_service.inputs import build_inputs, tokenize_conditions

logger = logging.getLogger(__name__)


class CodebookOnly(LogitsProcessor):
    """Only codebook ids inside a grid: image start/end and every other special id are masked, so a
    plan is always complete. Runs after the sampling warpers, so where those already leave no
    special id it changes nothing (sampling stays identical to the reference)."""

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] > self.codebook_size:
            scores[:, self.codebook_size :] = -float("inf")
        return scores


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


class _QueueStreamer(BaseStreamer):
    """Hands each new token from the generating thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.skipped_prompt = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.skipped_prompt:  # generate() first passes the prompt
            self.skipped_prompt = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.view(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class TransformersEngine(PlanEngine):
    name = "transformers"
    default_max_in_flight = 1  # generate() uses torch's global RNG: one plan at a time

    def __init__(self, model_dir: str, device: str = ""):
        self.model_dir = model_dir
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # One worker thread: the model is not shared between concurrent generate() calls.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="planner-transformers")
        self.model: GlmImageForConditionalGeneration | None = None  # set by start()
        self.processor: GlmImageProcessor | None = None

    def _load(self) -> None:
        self.processor = GlmImageProcessor.from_pretrained(f"{self.model_dir}/processor")
        model = GlmImageForConditionalGeneration.from_pretrained(
            f"{self.model_dir}/vision_language_encoder", dtype="auto"
        ).to(self.device)
        model.eval()
        self.model = model
        self.codebook_size = model.config.vq_config.num_embeddings

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._worker, self._load)

    def _prepare(self, job: PlanJob):
        inputs, layout = build_inputs(self.processor, job.prompt, job.width, job.height, job.images)
        inputs = inputs.to(self.device)
        return inputs, tokenize_conditions(self.model, inputs, layout)

    async def prepare(self, job: PlanJob) -> PlanLayout:
        inputs, layout = await asyncio.get_running_loop().run_in_executor(self._worker, self._prepare, job)
        job.engine_inputs = inputs
        return layout

    def _generation_kwargs(self, job: PlanJob, layout: PlanLayout) -> dict:
        sampling = job.sampling
        # Exactly the grids: CodebookOnly keeps the end id out, so nothing stops generation early.
        kwargs = {"max_new_tokens": layout.total_tokens}
        if sampling.temperature == 0:
            kwargs["do_sample"] = False
        else:
            kwargs["do_sample"] = True  # as diffusers calls it, whatever the checkpoint says
            for name in ("temperature", "top_p", "top_k"):
                value = getattr(sampling, name)
                if value is not None:
                    kwargs[name] = value
        return kwargs

    def _generate(self, job: PlanJob, layout: PlanLayout, streamer: _QueueStreamer, cancel: threading.Event) -> None:
        # diffusers seeds the global generator with the request's seed before generate()
        torch.manual_seed(job.seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(job.seed)
        assert self.model is not None, "generate() before start()"
        with torch.inference_mode():
            self.model.generate(
                **job.engine_inputs,
                **self._generation_kwargs(job, layout),
                logits_processor=LogitsProcessorList([CodebookOnly(self.codebook_size)]),
                stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                streamer=streamer,
            )

    async def generate(self, job: PlanJob, layout: PlanLayout) -> AsyncIterator[list[int]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        done = loop.run_in_executor(self._worker, self._generate, job, layout, _QueueStreamer(loop, queue), cancel)
        try:
            while (tokens := await queue.get()) is not None:
                yield tokens
            await done  # re-raises a generation error
        finally:
            # Cancelled or closed early: stop generate() at the next token and wait for the
            # worker, so the next plan starts on a free engine.
            cancel.set()
            with contextlib.suppress(Exception):
                await asyncio.shield(done)
            job.engine_inputs = None

    async def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")

    async def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
