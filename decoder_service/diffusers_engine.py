"""The decoder engine over diffusers' GlmImagePipeline, loaded without its AR model.

`GlmImagePipeline.__call__` runs as one block; here it is cut where the engine interface needs it:
`prepare` (glyph embeddings, seeded noise, condition latents, timesteps) and `add_conditions` (the
i2i KV cache) run while the plan is still streaming in, then `begin`, one `step` per denoising step
and `finish` (VAE decode). Each uses the pipeline's own building blocks (encode_prompt,
prepare_latents, the VAE, GlmImageKVCache, calculate_shift/retrieve_timesteps, the transformer, the
scheduler, the image processor) in the order and dtypes `__call__` uses them, and the noise is the
first draw of `torch.Generator("cpu").manual_seed(seed)`, so that the pixels are identical to
`pipe(prompt=..., prior_token_ids=..., generator=...)` with the same plan and seed.

Per-request state lives in `_Request` (its own scheduler copy, KV cache, generator), never on the
pipeline object, whose `_guidance_scale` & co. belong to `__call__`.
"""

import copy
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_latents, retrieve_timesteps
from PIL import Image

from decoder_service.domain import ConditionPlan, DecodeJob
from decoder_service.engine import DecoderEngine, EngineInfo
from imagekit.condition_images import ResizeRule, read_condition_images
from servekit.errors import InvalidRequest
from servekit.plan_format import AR_FOLDER, plan_format
from servekit.validation import SIZE_MULTIPLE

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SEQUENCE_LENGTH = 2048  # __call__'s default for the glyph encoder


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return DTYPES[name]


@dataclass
class _Condition:
    pixels: torch.Tensor  # the preprocessed image, on the device, in the pipeline dtype
    latent: torch.Tensor  # its normalized VAE latent
    patch_rows: int  # the DiT's patch grid of the latent
    patch_cols: int


@dataclass
class _Denoise:
    """The denoising loop's step-invariant inputs and its position."""

    prior_token_ids: torch.Tensor  # the target grid upsampled to the DiT's patch grid
    drop_cond: torch.Tensor
    drop_uncond: torch.Tensor
    target_size: torch.Tensor
    crop_coords: torch.Tensor
    index: int = 0


@dataclass
class _Request:
    job: DecodeJob
    generator: torch.Generator
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    latents: torch.Tensor
    scheduler: FlowMatchEulerDiscreteScheduler  # GlmImagePipeline's scheduler type
    timesteps: torch.Tensor
    conditions: list[_Condition] = field(default_factory=list)
    kv_caches: GlmImageKVCache | None = None
    denoise: _Denoise | None = None
    last_step: tuple[torch.Tensor, torch.Tensor] | None = None  # (latents, velocity) of the last step, for previews


class DiffusersEngine(DecoderEngine):
    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str = "auto", plan_format_override: str = ""):
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device.type)
        self._plan_format_override = plan_format_override
        self.pipe: GlmImagePipeline | None = None
        self.resize_rule: ResizeRule | None = None
        self._info: EngineInfo | None = None

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("the engine is not loaded")
        return self._info

    @property
    def _pipeline(self) -> GlmImagePipeline:
        """The loaded pipeline (`pipe`, which is None before `load` and after `close`)."""
        if self.pipe is None:
            raise RuntimeError("the engine is not loaded")
        return self.pipe

    def _plan_format(self) -> str:
        if self._plan_format_override:
            return self._plan_format_override
        try:
            return plan_format(self.model_dir)
        except (OSError, KeyError) as error:
            raise RuntimeError(
                f"cannot compute the plan format from {self.model_dir / AR_FOLDER} ({error}); mount the AR "
                "folder's codebook shard or pass --plan-format (the planner's GetServerInfo reports it)"
            ) from error

    def _resize_rule(self) -> ResizeRule:
        if not (self.model_dir / "processor").is_dir():
            raise RuntimeError(
                f"{self.model_dir / 'processor'} is missing: mount the checkpoint's processor/ folder (a few KB); "
                "the decoder sizes condition images by its rule, as the planner does"
            )
        return ResizeRule.from_checkpoint(self.model_dir)

    def load(self) -> None:
        started = time.perf_counter()
        fmt = self._plan_format()  # first: a missing codebook fails before the long load
        self.resize_rule = self._resize_rule()
        pipe = GlmImagePipeline.from_pretrained(
            self.model_dir, vision_language_encoder=None, processor=None, dtype=self.dtype
        )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        codebook = int(pipe.transformer.config.prior_vq_quantizer_codebook_size)
        declared = re.search(r"/vq(\d+)/", fmt)
        if declared and int(declared.group(1)) != codebook:
            raise RuntimeError(
                f"plan format {fmt!r} is for a codebook of {declared.group(1)}; this DiT's has {codebook}"
            )
        self._info = EngineInfo(model=str(self.model_dir), engine="diffusers", plan_format=fmt, codebook_size=codebook)
        logger.info(
            "loaded %s (decoder only) on %s as %s in %.1f s: plan_format %s, codebook %d",
            self.model_dir, self.device, self.dtype, time.perf_counter() - started, fmt, codebook,
        )  # fmt: skip

    # -- prepare: everything the plan is not needed for ---------------------------------------

    def read_conditions(self, job: DecodeJob) -> list[Image.Image]:
        if self.resize_rule is None:
            raise RuntimeError("the engine is not loaded")
        return read_condition_images(job.condition_images, self.resize_rule)

    @torch.no_grad()
    def prepare(self, job: DecodeJob, images: Sequence[Image.Image]) -> _Request:
        pipe, device = self._pipeline, self.device

        # __call__ step 4: condition images floored to a whole number of DiT patches
        multiple = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        preprocessed = []
        for image in images:
            height, width = (image.height // multiple) * multiple, (image.width // multiple) * multiple
            preprocessed.append(pipe.image_processor.preprocess(image, height=height, width=width))

        # step 5: glyph embeddings (and the empty ones of the unconditional branch)
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            job.prompt, job.guidance_scale > 1, num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH, device=device, dtype=pipe.dtype,
        )  # fmt: skip

        # step 6: the seeded noise (the generator's first draw), then the condition latents
        generator = torch.Generator("cpu").manual_seed(job.seed)
        latents = pipe.prepare_latents(
            batch_size=1, num_channels_latents=pipe.transformer.config.in_channels, height=job.height,
            width=job.width, dtype=prompt_embeds.dtype, device=device, generator=generator,
        )  # fmt: skip
        conditions = []
        if preprocessed:
            mean, std = self._latents_stats(prompt_embeds.dtype)
            patch = pipe.transformer.config.patch_size
            for pixels in preprocessed:
                pixels = pixels.to(device=device, dtype=prompt_embeds.dtype)
                latent = retrieve_latents(pipe.vae.encode(pixels), generator=generator, sample_mode="argmax")
                latent = (latent - mean) / std
                conditions.append(_Condition(pixels, latent, latent.shape[-2] // patch, latent.shape[-1] // patch))

        # step 7: the timestep schedule, on a scheduler of this request's own
        scheduler = copy.deepcopy(pipe.scheduler)
        image_seq_len = ((job.height // pipe.vae_scale_factor) * (job.width // pipe.vae_scale_factor)) // (
            pipe.transformer.config.patch_size**2
        )
        timesteps = np.linspace(scheduler.config.num_train_timesteps, 1.0, job.steps + 1)[:-1]
        timesteps = timesteps.astype(np.int64).astype(np.float32)
        sigmas = timesteps / scheduler.config.num_train_timesteps
        mu = calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("base_shift", 0.25),
            scheduler.config.get("max_shift", 0.75),
        )
        timesteps, _ = retrieve_timesteps(scheduler, job.steps, device, timesteps, sigmas, mu=mu)
        return _Request(
            job=job, generator=generator, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            latents=latents, scheduler=scheduler, timesteps=timesteps, conditions=conditions,
        )  # fmt: skip

    def _latents_stats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        config = self._pipeline.vae.config
        shape = (1, config.latent_channels, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(device=self.device, dtype=dtype)
        std = torch.tensor(config.latents_std).view(shape).to(device=self.device, dtype=dtype)
        return mean, std

    # -- the i2i reference KV cache, once the plan header has the condition grids --------------

    @torch.no_grad()
    def add_conditions(self, request: _Request, plans: Sequence[ConditionPlan]) -> None:
        pipe, device = self._pipeline, self.device
        if len(plans) != len(request.conditions):
            raise InvalidRequest(f"the plan has {len(plans)} condition grids for {len(request.conditions)} images")
        for index, (condition, plan) in enumerate(zip(request.conditions, plans, strict=True)):
            if (2 * plan.rows, 2 * plan.cols) != (condition.patch_rows, condition.patch_cols):
                height, width = condition.pixels.shape[-2:]
                raise InvalidRequest(
                    f"the plan's condition_images[{index}] grid is {plan.rows}x{plan.cols} (rows x cols, 32 px cells) "
                    f"but the image, at {width}x{height} pixels, needs "
                    f"{condition.patch_rows / 2:g}x{condition.patch_cols / 2:g}: send the same images as planned, to "
                    "a planner and a decoder of the same checkpoint"
                )
        kv_caches = GlmImageKVCache(num_layers=pipe.transformer.config.num_layers)
        kv_caches.set_mode("write")
        embeds = request.prompt_embeds
        for condition, plan in zip(request.conditions, plans, strict=True):
            prior = self._upsample(plan.ids, plan.rows, plan.cols)[0]
            pipe.transformer(
                hidden_states=condition.latent,
                encoder_hidden_states=torch.zeros_like(embeds)[:1, :0, ...],
                prior_token_id=prior,
                prior_token_drop=torch.full_like(prior, False, dtype=torch.bool),
                timestep=torch.zeros((1,), device=device),
                target_size=torch.tensor([condition.pixels.shape[-2:]], device=device),
                crop_coords=torch.zeros((1, 2), device=device),
                attention_kwargs=None,
                kv_caches=kv_caches,
            )
        kv_caches.next_sample()
        request.kv_caches = kv_caches

    def _upsample(self, ids: Sequence[int], rows: int, cols: int) -> torch.Tensor:
        """d32 grid -> the DiT's d16 patch grid (nearest, as the pipeline does), shape (1, 4*rows*cols)."""
        return self._pipeline._upsample_token_ids(torch.tensor(ids, dtype=torch.long), rows, cols).to(self.device)

    # -- denoise and VAE-decode, once the plan is complete --------------------------------------

    @torch.no_grad()
    def begin(self, request: _Request, target_ids: Sequence[int]) -> int:
        """__call__ steps 7 and 8 up to the loop: the plan upsampled, the step-invariant inputs."""
        pipe, device, job = self._pipeline, self.device, request.job
        if request.conditions and request.kv_caches is None:
            raise RuntimeError("begin() of an image-to-image request before add_conditions()")
        if request.kv_caches is None:
            request.kv_caches = GlmImageKVCache(num_layers=pipe.transformer.config.num_layers)
        prior_token_ids = self._upsample(target_ids, job.height // SIZE_MULTIPLE, job.width // SIZE_MULTIPLE)
        dtype = request.prompt_embeds.dtype
        request.denoise = _Denoise(
            prior_token_ids=prior_token_ids,
            drop_cond=torch.full_like(prior_token_ids, False, dtype=torch.bool),
            drop_uncond=torch.full_like(prior_token_ids, True, dtype=torch.bool),
            target_size=torch.tensor([(job.height, job.width)], dtype=dtype, device=device),
            crop_coords=torch.tensor([(0, 0)], dtype=dtype, device=device),
        )
        return len(request.timesteps)

    @torch.no_grad()
    def step(self, request: _Request) -> None:
        """One iteration of __call__'s denoising loop."""
        pipe, job, state, kv_caches = self._pipeline, request.job, request.denoise, request.kv_caches
        assert state is not None and kv_caches is not None, "step() before begin()"
        t = request.timesteps[state.index]
        latents = request.latents
        latent_model_input = latents.to(pipe.transformer.dtype)
        timestep = t.expand(latents.shape[0]) - 1
        inputs = dict(
            hidden_states=latent_model_input, prior_token_id=state.prior_token_ids, timestep=timestep,
            target_size=state.target_size, crop_coords=state.crop_coords, attention_kwargs=None, return_dict=False,
            kv_caches=kv_caches,
        )  # fmt: skip
        if request.conditions:
            kv_caches.set_mode("read")
        noise_pred_cond = pipe.transformer(
            encoder_hidden_states=request.prompt_embeds, prior_token_drop=state.drop_cond, **inputs
        )[0].float()
        if job.guidance_scale > 1:  # __call__'s do_classifier_free_guidance
            if request.conditions:
                kv_caches.set_mode("skip")
            noise_pred_uncond = pipe.transformer(
                encoder_hidden_states=request.negative_prompt_embeds, prior_token_drop=state.drop_uncond, **inputs
            )[0].float()
            noise_pred = noise_pred_uncond + job.guidance_scale * (noise_pred_cond - noise_pred_uncond)
        else:
            noise_pred = noise_pred_cond
        request.latents = request.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if job.previews:
            request.last_step = latents, noise_pred
        state.index += 1
        if request.latents.is_cuda:
            torch.cuda.synchronize(request.latents.device)  # the step is done when it returns

    @torch.no_grad()
    def finish(self, request: _Request) -> Image.Image:
        """The end of __call__: KV cache cleared, latents de-normalized, VAE decode, postprocess."""
        assert request.kv_caches is not None, "finish() before begin() or after release()"
        request.kv_caches.clear()
        pipe = self._pipeline
        vae = pipe.vae
        latents = request.latents.to(vae.dtype)
        mean, std = self._latents_stats(latents.dtype)
        latents = latents * std + mean
        image = vae.decode(latents, return_dict=False, generator=request.generator)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    @torch.no_grad()
    def preview(self, request: _Request, max_side: int) -> Image.Image:
        """The flow-matching estimate of the clean latents after the last step (x0 = x_t - sigma_t * v),
        average-pooled by 2, or by 4 when that brings the longer side to `max_side` or less (latent
        sides are multiples of 4), then VAE-decoded: a quarter or a sixteenth of the final decode."""
        assert request.last_step is not None, "preview() before a step of a job with previews"
        latents, velocity = request.last_step
        scheduler = request.scheduler
        sigma = float(scheduler.sigmas[scheduler.step_index - 1])
        estimate = latents.float() - sigma * velocity.float()
        factor = 4 if max(request.job.width, request.job.height) // 2 > max_side else 2
        estimate = torch.nn.functional.avg_pool2d(estimate, factor)
        pipe = self._pipeline
        vae = pipe.vae
        estimate = estimate.to(vae.dtype)
        mean, std = self._latents_stats(estimate.dtype)
        image = vae.decode(estimate * std + mean, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    def release(self, request: _Request) -> None:
        if request is not None and request.kv_caches is not None:
            request.kv_caches.clear()
            request.kv_caches = None

    def close(self) -> None:
        self.pipe = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
