"""The real-shape GLM-Image, one layer deep: the checkpoint's widths, vocabularies and codebook in
its folder layout, layers as the memory accounting counts them, loadable by the services' code."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import GlmImageForConditionalGeneration, GlmImageProcessor

from decoder_service.diffusers_engine import DiffusersEngine
from decoder_service.domain import DecodeJob
from planner_service.inputs import build_inputs
from testkit import real_shape

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """1 AR, 1 ViT and 1 DiT layer in bf16: ~4 GB on disk, ~4.5 GB of memory while it is built."""
    out = tmp_path_factory.mktemp("real-shape") / "model"
    assert real_shape.write_real_shape(out, ar_layers=1, dit_layers=1, vision_layers=1, dtype="bfloat16")
    return out


def _config(root, folder: str) -> dict:
    return json.loads((root / folder / "config.json").read_text())


def _parameters(path, prefix: str) -> int:
    with safe_open(str(path), framework="pt") as weights:
        return sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys() if key.startswith(prefix))


def test_configs_carry_the_real_shapes(real_dir):
    ar = _config(real_dir, "vision_language_encoder")
    text, vision = ar["text_config"], ar["vision_config"]
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]) == (4096, 32, 2)
    assert (text["intermediate_size"], text["vocab_size"], text["vision_vocab_size"]) == (13696, 168064, 16512)
    assert (vision["hidden_size"], vision["num_heads"], vision["patch_size"]) == (1536, 16, 16)
    assert ar["vq_config"]["num_embeddings"] == 16384
    assert (text["num_hidden_layers"], vision["depth"]) == (1, 1)
    dit = _config(real_dir, "transformer")
    assert (dit["num_attention_heads"], dit["attention_head_dim"], dit["num_layers"]) == (32, 128, 1)
    assert (dit["prior_vq_quantizer_codebook_size"], dit["text_embed_dim"], dit["in_channels"]) == (16384, 1472, 16)
    assert _config(real_dir, "text_encoder")["d_model"] == 1472
    assert _config(real_dir, "vae")["latent_channels"] == 16
    tokenizer = GlmImageProcessor.from_pretrained(real_dir / "processor").tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (ar["image_start_token_id"], ar["image_end_token_id"])
    assert tokenizer.convert_tokens_to_ids(tokenizer.image_token) == ar["image_token_id"] == 167855
    assert tokenizer.pad_token_id == text["pad_token_id"] == 167841


def test_a_layer_has_the_parameters_the_memory_accounting_counts(real_dir):
    ar = real_dir / "vision_language_encoder" / "model.safetensors"
    assert _parameters(ar, "model.language_model.layers.0.") == real_shape.ar_layer_parameters()
    assert _parameters(ar, "model.visual.blocks.0.") == real_shape.vision_layer_parameters()
    dit = real_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    assert _parameters(dit, "transformer_blocks.0.") == real_shape.dit_layer_parameters()
    # the formula by hand, for the published GLM-4-9B widths: q/k/v/o with GQA and biases, gate_up + down, 4 norms
    assert real_shape.ar_layer_parameters() == 4096 * (4096 + 2 * 256) + (4096 + 2 * 256) + 4096 * 4096 + 3 * 4096 * 13696 + 4 * 4096  # fmt: skip


@torch.inference_mode()
def test_the_planner_s_loading_code_decodes_over_the_vision_vocabulary(real_dir):
    processor = GlmImageProcessor.from_pretrained(real_dir / "processor")
    model = GlmImageForConditionalGeneration.from_pretrained(real_dir / "vision_language_encoder", dtype="auto")
    assert model.dtype == torch.bfloat16
    inputs, layout = build_inputs(processor, "a sign that says 'OPEN'", 1024, 1024, [])
    assert (layout.preview, layout.target) == ((16, 16), (32, 32))
    output = model.eval().generate(
        **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert len(output.logits) == 4
    assert all(logits.shape[-1] == 16512 and torch.isfinite(logits).all() for logits in output.logits)


def test_the_decoder_engine_loads_it_and_makes_an_image(real_dir):
    engine = DiffusersEngine(real_dir, device="cpu", dtype="bfloat16")
    engine.load()
    assert engine.info.codebook_size == 16384 and engine.info.plan_format.startswith("glm-image/vq16384/")
    # the smallest size: the weights are what is tested here, and the VAE decode is slow on CPU in bf16
    job = DecodeJob(request_id="r", prompt="a sign that says 'OPEN'", width=64, height=64, seed=0, steps=1,
                    guidance_scale=1.5, condition_images=())  # fmt: skip
    request = engine.prepare(job, [])
    engine.begin(request, [16383, 0, 1, 2])
    engine.step(request)
    assert engine.finish(request).size == (64, 64)
