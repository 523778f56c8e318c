"""The production engine: vLLM's AsyncLLM running GLM-Image's AR stage (planner_service.vllm_model).

Plans of all sizes are batched continuously. The planner renders each prompt with the checkpoint's
processor and chat template (as the transformers engine does) and hands vLLM token ids; condition
images are tokenized here, by the checkpoint's ViT + VQ only (the AR decoder is loaded by vLLM
alone), and reach vLLM as their grids of codebook ids.

vLLM's own engine flags pass through under vLLM's names (--tensor-parallel-size,
--gpu-memory-utilization, --max-num-seqs, --dtype, --enforce-eager, ...). Defaults that differ from
vLLM's, each only when its flag is absent:
- --dtype: the checkpoint's own dtype ("auto" means that too), so that plans match transformers';
- --skip-tokenizer-init: on; prompts arrive as token ids and plans leave as token ids;
- --max-model-len: what the largest request the planner's limits allow needs (context_length: the
  chat template with the plan grids at --max-side x --max-side, a prompt of --max-prompt-chars
  tokens, --max-condition-images condition grids at the processor's largest size), at most the
  checkpoint's maximum; a request that still does not fit is refused up front (INVALID_ARGUMENT);
- on CPU only: --enforce-eager (no compilation
  at start-up; --no-enforce-eager compiles with inductor, which takes about half a minute cold and
  roughly doubles the tiny model's throughput on a 2-core CPU); and, unless already set, the
  environment VLLM_HOST_IP=127.0.0.1 (no network lookup) and VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache).
"""

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from safetensors import safe_open
from transformers import GenerationConfig, GlmImageConfig, GlmImageForConditionalGeneration, GlmImageProcessor

from imagekit.condition_images import ResizeRule
from planner_service.engine import PlanEngine, PlanJob, PlanLayout
from planner_service.inputs import build_inputs, tokenize_conditions
from servekit.errors import InvalidRequest
from servekit.validation import Limits

if TYPE_CHECKING:  # imported when the engine starts: vLLM's import is slow
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

CPU_ENVIRONMENT = {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}
CONDITION_PREFIXES = ("model.visual.", "model.vqmodel.")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def checkpoint_dtype(config_path: Path) -> str:
    config = json.loads(config_path.read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


def context_length(model_dir: str, limits: Limits) -> int:
    """Tokens of context the largest request within `limits` can need, rounded up to 1024: the plan
    at max_side x max_side after its prompt as the chat template renders it, either text only (with
    the preview grid) or with max_condition_images condition images at the processor's largest
    size, plus one token per prompt character."""
    root = Path(model_dir)
    processor = GlmImageProcessor.from_pretrained(root / "processor")
    side = math.isqrt(ResizeRule.from_checkpoint(root).max_pixels)
    largest = Image.new("RGB", (side, side))
    needed = 0
    for images in ([], [largest] * limits.max_condition_images):
        _, layout = build_inputs(processor, "", limits.max_side, limits.max_side, images)
        needed = max(needed, layout.prompt_tokens + layout.total_tokens)
    return -(-(needed + limits.max_prompt_chars) // 1024) * 1024


def parse_engine_args(model_dir: str, argv: list[str], limits: Limits):
    """vLLM's AsyncEngineArgs from vLLM's own CLI flags, with the planner's defaults (module doc).
    Unknown flags or bad values stop the planner at start-up with vLLM's message."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str):
            raise SystemExit(f"vLLM engine arguments: {message}")

    parser = AsyncEngineArgs.add_cli_args(Parser(prog="python -m planner_service", add_help=False))
    namespace = parser.parse_args(argv)
    # The flags given explicitly: parsed again with every default replaced by a marker.
    unset = object()
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), unset))
    explicit = {name for name, value in vars(parser.parse_args(argv)).items() if value is not unset}

    root = Path(model_dir)
    namespace.model = str(root / "vision_language_encoder")
    if "tokenizer" not in explicit:
        namespace.tokenizer = str(root / "processor")
    if namespace.dtype == "auto":
        namespace.dtype = checkpoint_dtype(root / "vision_language_encoder" / "config.json")
    if "skip_tokenizer_init" not in explicit:
        namespace.skip_tokenizer_init = True
    if "max_model_len" not in explicit:
        maximum = GlmImageConfig.from_pretrained(namespace.model).text_config.max_position_embeddings
        namespace.max_model_len = min(context_length(model_dir, limits), maximum)
    if _on_cpu() and not explicit & {"enforce_eager", "compilation_config", "optimization_level"}:
        namespace.enforce_eager = True
    return AsyncEngineArgs.from_cli_args(namespace)


def load_condition_tokenizer(model_path: str, device: torch.device) -> GlmImageForConditionalGeneration:
    """GlmImageForConditionalGeneration with only its ViT + VQ materialised (the text decoder stays on
    the meta device: vLLM holds it), for planner_service.inputs.tokenize_conditions."""
    path = Path(model_path)
    config = GlmImageConfig.from_pretrained(path)
    with torch.device("meta"):
        model = GlmImageForConditionalGeneration(config)
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt", device=str(device)) as weights:
            state.update({key: weights.get_tensor(key) for key in weights.keys() if key.startswith(CONDITION_PREFIXES)})
    parts = [model.model.visual, model.model.vqmodel]
    expected = {f"model.{prefix}.{key}" for prefix, part in zip(("visual", "vqmodel"), parts, strict=True)
                for key in part.state_dict()}  # fmt: skip
    missing = expected - state.keys()
    if missing:
        raise RuntimeError(f"{path}: condition-image weights missing: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)  # in the checkpoint's own dtype
    return model.eval()


class VllmEngine(PlanEngine):
    name = "vllm"
    default_max_in_flight = 64  # continuous batching: vLLM schedules every admitted plan at once

    def __init__(self, model_dir: str, engine_args: list[str], limits: Limits):
        self.model_dir = model_dir
        self.engine_args = parse_engine_args(model_dir, engine_args, limits)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Prompt rendering and the ViT + VQ run off the event loop, one job at a time.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="planner-vllm-inputs")
        self._request_ids = itertools.count()
        self.engine: AsyncLLM | None = None  # set by start()
        self.processor: GlmImageProcessor | None = None
        self.conditions: GlmImageForConditionalGeneration | None = None

    def _load_inputs(self) -> None:
        model_path = self.engine_args.model
        self.processor = GlmImageProcessor.from_pretrained(f"{self.model_dir}/processor")
        self.conditions = conditions = load_condition_tokenizer(model_path, self.device)
        self.codebook_size = conditions.config.vq_config.num_embeddings
        self.codebook_ids = list(range(self.codebook_size))
        self.generation = GenerationConfig.from_pretrained(model_path)

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        if _on_cpu():
            for key, value in CPU_ENVIRONMENT.items():
                os.environ.setdefault(key, value)
        loop = asyncio.get_running_loop()
        logger.info("starting vLLM for %s", self.engine_args.model)
        # vLLM first: it sizes its memory from what is free, and the ViT + VQ are small.
        self.engine = await loop.run_in_executor(None, AsyncLLM.from_engine_args, self.engine_args)
        try:
            await loop.run_in_executor(self._worker, self._load_inputs)
        except BaseException:
            await self.shutdown()
            raise

    def _prepare(self, job: PlanJob):
        inputs, layout = build_inputs(self.processor, job.prompt, job.width, job.height, job.images)
        layout = tokenize_conditions(self.conditions, inputs.to(self.device), layout)
        prompt = {"prompt_token_ids": inputs["input_ids"][0].tolist()}
        if layout.conditions:
            prompt["multi_modal_data"] = {
                "image": [torch.tensor(c.ids, dtype=torch.int64).view(c.rows, c.cols) for c in layout.conditions]
            }
        return prompt, layout

    @property
    def context_tokens(self) -> int:
        """Prompt + plan tokens a request may hold: vLLM's own figure once started (--max-model-len
        may say "auto"), the engine arguments' before."""
        return self.engine.model_config.max_model_len if self.engine else self.engine_args.max_model_len

    async def prepare(self, job: PlanJob) -> PlanLayout:
        prompt, layout = await asyncio.get_running_loop().run_in_executor(self._worker, self._prepare, job)
        context = self.context_tokens
        if layout.prompt_tokens + layout.total_tokens > context:
            # vLLM would stop the plan at the context's end: refuse it before any token is written.
            raise InvalidRequest(
                f"this request needs {layout.prompt_tokens + layout.total_tokens} tokens of context (prompt and "
                f"condition images {layout.prompt_tokens}, plan {layout.total_tokens}); this planner holds "
                f"{context} (vLLM --max-model-len): use a shorter prompt, fewer condition images or a smaller size"
            )
        job.engine_inputs = prompt
        return layout

    def sampling_params(self, job: PlanJob, layout: PlanLayout):
        """Exactly the grids (only codebook ids may be sampled, so no end id cuts a grid short),
        seeded per request; unset fields come from the checkpoint's generation config."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = job.sampling
        if sampling.temperature == 0:
            choice = {"temperature": 0.0}
        else:
            choice = {
                "temperature": self.generation.temperature if sampling.temperature is None else sampling.temperature,
                "top_p": self.generation.top_p if sampling.top_p is None else sampling.top_p,
                "top_k": (self.generation.top_k or 0) if sampling.top_k is None else sampling.top_k,
            }
        return SamplingParams(
            **choice,
            max_tokens=layout.total_tokens,
            min_tokens=layout.total_tokens,
            allowed_token_ids=self.codebook_ids,
            seed=job.seed,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
        )

    async def generate(self, job: PlanJob, layout: PlanLayout) -> AsyncIterator[list[int]]:
        request_id = f"{job.request_id}-{next(self._request_ids)}"
        engine = self.engine
        assert engine is not None, "generate() before start()"
        stream = engine.generate(job.engine_inputs, self.sampling_params(job, layout), request_id)
        finished = False
        try:
            async for output in stream:
                finished = output.finished
                if tokens := list(output.outputs[0].token_ids):
                    yield tokens
        finally:
            # Closed early (cancelled, deadline, client gone): free the request in vLLM now.
            if not finished:
                with contextlib.suppress(Exception):
                    await engine.abort(request_id)
            await stream.aclose()
            job.engine_inputs = None

    async def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("vLLM engine not started")
        await self.engine.check_health()

    async def shutdown(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
        self._worker.shutdown(wait=True, cancel_futures=True)
