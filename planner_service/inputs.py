"""Model inputs, built exactly as diffusers' GlmImagePipeline.generate_prior_tokens builds them:
the checkpoint's processor and chat template render the prompt with the target and preview grid
sizes, and (image-to-image) expand each condition image into its grid of placeholders."""

import torch
from PIL import Image
from transformers import BatchFeature, GlmImageProcessor

from planner_service.engine import ConditionGrid, PlanLayout


def build_inputs(
    processor: GlmImageProcessor, prompt: str, width: int, height: int, images: list[Image.Image]
) -> tuple[BatchFeature, PlanLayout]:
    """The processor's inputs for one request, and the grids it implies (condition ids not yet filled)."""
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": prompt})
    inputs = processor.apply_chat_template(
        [[{"role": "user", "content": content}]],
        tokenize=True,
        processor_kwargs={"target_h": height, "target_w": width},
        return_dict=True,
        return_tensors="pt",
    )
    grids = [(int(h), int(w)) for _, h, w in inputs["image_grid_thw"].tolist()]
    if images:  # [conditions..., target]: only the target is generated
        conditions, target, preview = grids[: len(images)], grids[-1], (0, 0)
    else:  # [target, preview]: the preview is generated first
        conditions, target, preview = [], grids[0], grids[1]
    layout = PlanLayout(
        preview=preview,
        target=target,
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        conditions=[ConditionGrid(rows, cols, []) for rows, cols in conditions],
    )
    return inputs, layout


@torch.inference_mode()
def tokenize_conditions(model, inputs: BatchFeature, layout: PlanLayout) -> PlanLayout:
    """Each condition image's codebook ids, with the checkpoint's ViT + VQ (as diffusers does).
    `model` offers get_image_features / get_image_tokens (GlmImageForConditionalGeneration)."""
    if not layout.conditions:
        return layout
    grids = inputs["image_grid_thw"][: len(layout.conditions)]
    features = model.get_image_features(inputs["pixel_values"], grids).pooler_output
    ids = model.get_image_tokens(torch.cat(features, dim=0), grids).view(-1).tolist()
    conditions, start = [], 0
    for grid in layout.conditions:
        count = grid.rows * grid.cols
        conditions.append(ConditionGrid(grid.rows, grid.cols, ids[start : start + count]))
        start += count
    return PlanLayout(layout.preview, layout.target, layout.prompt_tokens, conditions)
