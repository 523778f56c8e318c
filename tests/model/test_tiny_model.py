"""The tiny GLM-Image: deterministic, in the real layout, loadable by diffusers and transformers."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GlmImageForConditionalGeneration, GlmImageProcessor

from testkit.tiny_model import CODEBOOK_SIZE, describe, write_tiny_model

pytestmark = pytest.mark.unit

LAYOUT = {
    "model_index.json",
    "processor/processor_config.json",
    "processor/tokenizer.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vision_language_encoder/config.json",
    "vision_language_encoder/generation_config.json",
    "vision_language_encoder/model.safetensors",
}


def test_two_builds_are_byte_identical(tmp_path):
    """Built in two processes (different hash seeds), the files are the same bytes."""
    assert write_tiny_model(tmp_path / "a")
    subprocess.run([sys.executable, "-m", "testkit.tiny_model", str(tmp_path / "b")], check=True, capture_output=True)
    first, second = describe(tmp_path / "a"), describe(tmp_path / "b")
    assert first == second
    assert LAYOUT <= first.keys()
    assert not write_tiny_model(tmp_path / "a"), "an up-to-date folder is not rebuilt"


def test_config_constraints(model_dir):
    ar = json.loads((model_dir / "vision_language_encoder/config.json").read_text())
    dit = json.loads((model_dir / "transformer/config.json").read_text())
    text = ar["text_config"]
    assert text["vision_vocab_size"] == ar["vq_config"]["num_embeddings"] == CODEBOOK_SIZE
    assert dit["prior_vq_quantizer_codebook_size"] == CODEBOOK_SIZE
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim == 64  # a head size vLLM's CPU attention supports
    rope = text["rope_parameters"]
    assert sum(rope["mrope_section"]) * 2 == head_dim * rope["partial_rotary_factor"]
    assert (ar["image_start_token_id"], ar["image_end_token_id"]) == (CODEBOOK_SIZE, CODEBOOK_SIZE + 1)


def test_diffusers_generates_an_image(pipe):
    image = pipe(
        prompt="a poster that says 'HELLO'", height=256, width=256, num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]  # fmt: skip
    pixels = np.asarray(image)
    assert image.size == (256, 256) and pixels.shape == (256, 256, 3)
    assert pixels.std() > 1.0, "the image is not a flat colour"


def test_tokenizer_matches_the_real_special_token_layout(model_dir):
    processor = GlmImageProcessor.from_pretrained(model_dir / "processor")
    tokenizer = processor.tokenizer
    assert tokenizer.bos_token_id == CODEBOOK_SIZE
    assert tokenizer.eos_token_id == CODEBOOK_SIZE + 1
    assert (tokenizer.image_token, tokenizer.grid_bos_token, tokenizer.grid_eos_token) == (
        "<|image|>",
        "<sop>",
        "<eop>",
    )


def test_transformers_greedy_plan_is_diverse(model_dir):
    """Large init: a greedy 256x256 plan has many distinct ids (the default 0.02 init gives a handful)."""
    processor = GlmImageProcessor.from_pretrained(model_dir / "processor")
    model = GlmImageForConditionalGeneration.from_pretrained(model_dir / "vision_language_encoder").eval()
    messages = [[{"role": "user", "content": [{"type": "text", "text": "a poster that says 'HELLO'"}]}]]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, target_h=256, target_w=256, return_dict=True, return_tensors="pt"
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 16, 16]]  # target grid, then preview
    output = model.generate(**inputs, max_new_tokens=256 + 64 + 1, do_sample=False)
    plan = output[0, inputs["input_ids"].shape[1] :].tolist()
    preview, target = plan[:256], plan[256:320]
    assert all(0 <= i < CODEBOOK_SIZE for i in preview + target)
    assert len(set(preview + target)) >= 16
    assert len(set(target)) >= 8
