"""The monolithic reference: transformers + diffusers in one process, exactly as their authors run
them. The split services must reproduce these tokens and pixels.

    python -m testkit.reference MODEL_DIR OUT.png [--prompt P] [--size WxH] [--seed S] [--steps N]
"""

import argparse
import time
from pathlib import Path

import torch
from diffusers import GlmImagePipeline
from PIL import Image


def load_pipeline(model_dir: str | Path) -> GlmImagePipeline:
    return GlmImagePipeline.from_pretrained(model_dir).to("cpu")


def chat_inputs(pipe: GlmImagePipeline, prompt: str, width: int, height: int, images: list[Image.Image] | None = None):
    """The AR model's inputs, built as GlmImagePipeline.generate_prior_tokens builds them."""
    content = [{"type": "image", "image": image} for image in images or []]
    content.append({"type": "text", "text": prompt})
    return pipe.processor.apply_chat_template(
        [[{"role": "user", "content": content}]],
        tokenize=True, target_h=height, target_w=width, return_dict=True, return_tensors="pt",
    )  # fmt: skip


def greedy_plan(pipe: GlmImagePipeline, prompt: str, width: int, height: int, images=None) -> list[int]:
    """transformers' greedy generate: every generated token (preview grid, target grid, end slot)."""
    inputs = chat_inputs(pipe, prompt, width, height, images)
    grids = inputs["image_grid_thw"]
    n_images = len(images or [])
    # t2i: [target, preview] -> both are generated; i2i: [conditions..., target] -> only the target
    generated = grids[n_images:] if n_images else grids
    max_new_tokens = int(generated[:, 1:].prod(-1).sum()) + 1
    output = pipe.vision_language_encoder.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def sampled_target_grid(pipe: GlmImagePipeline, prompt: str, width: int, height: int, seed: int, images=None):
    """diffusers' own AR stage (sampled with the checkpoint's generation config, seeded as diffusers
    seeds it): the target grid at d32, row-major, and for i2i each condition image's d32 ids."""
    normalized = pipe._validate_and_normalize_images(images, 1) if images else None
    prior, condition_ids, condition_grids = pipe.generate_prior_tokens(
        prompt=prompt, height=height, width=width, image=normalized, device=torch.device("cpu"),
        generator=torch.Generator("cpu").manual_seed(seed),
    )  # fmt: skip
    rows, cols = height // 32, width // 32
    target = prior.view(2 * rows, 2 * cols)[::2, ::2].reshape(-1).tolist()
    conditions = []
    if condition_ids is not None:
        for ids, (_, h2, w2) in zip(
            torch.split(condition_ids[0], condition_grids[0].prod(-1).tolist()),
            condition_grids[0].tolist(),
            strict=True,
        ):
            conditions.append(ids.view(h2, w2)[::2, ::2].reshape(-1).tolist())
    return target, conditions


def upsample(ids: list[int], rows: int, cols: int) -> torch.Tensor:
    return GlmImagePipeline._upsample_token_ids(torch.tensor(ids, dtype=torch.long), rows, cols)


def render(
    pipe: GlmImagePipeline, prompt: str, width: int, height: int, seed: int, steps: int, guidance_scale: float = 1.5,
    target_ids: list[int] | None = None, images=None, condition_ids: list[list[int]] | None = None, **kwargs,
) -> Image.Image:  # fmt: skip
    """The whole pipeline call. With `target_ids` the AR stage is skipped (decoder-only use); `kwargs`
    go to the pipeline as they are (callback_on_step_end, say)."""
    if target_ids is not None:
        kwargs["prior_token_ids"] = upsample(target_ids, height // 32, width // 32)
        if images:
            grids = [(image.height // 32, image.width // 32) for image in images]
            kwargs["prior_token_image_ids"] = [
                torch.cat([upsample(ids, r, c)[0] for ids, (r, c) in zip(condition_ids, grids, strict=True)])
            ]
            kwargs["source_image_grid_thw"] = [torch.tensor([[1, 2 * r, 2 * c] for r, c in grids])]
    return pipe(
        prompt=prompt, image=images, height=height, width=width, num_inference_steps=steps,
        guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed), **kwargs,
    ).images[0]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate one image with the monolithic diffusers pipeline.")
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--prompt", default="a poster that says 'HELLO'")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    started = time.perf_counter()
    pipe = load_pipeline(args.model_dir)
    loaded = time.perf_counter()
    image = render(pipe, args.prompt, width, height, args.seed, args.steps)
    image.save(args.out)
    print(f"{args.out}: {width}x{height}, load {loaded - started:.1f} s, generate {time.perf_counter() - loaded:.2f} s")


if __name__ == "__main__":
    main()
