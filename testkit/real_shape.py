"""GLM-Image at the real checkpoint's shapes, with random weights, at a chosen depth.

Every width, head count, vocabulary and codebook size is zai-org/GLM-Image's (the source of each
value is next to its config below); only the number of layers, the dtype and the device are chosen,
so that memory and speed can be measured at the real widths where 16B parameters do not fit. Same
classes, files and folder layout as the checkpoint; tokenizers, processor, sampling defaults and
scheduler are built as testkit.tiny_model builds them. Its images are noise.

    python -m testkit.real_shape OUT_DIR [--ar-layers N] [--dit-layers M] [--vision-layers K]
        [--dtype bfloat16|float32|float16] [--device cpu|cuda]

Depths default to the real ones (40 / 30 / 40: ~16B parameters, ~32 GB in bf16). An OUT_DIR that
already holds the same build is kept.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL, GlmImagePipeline, GlmImageTransformer2DModel  # noqa: E402
from transformers import (  # noqa: E402
    ByT5Tokenizer,
    GlmImageConfig,
    GlmImageForConditionalGeneration,
    GlmImageProcessor,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
)
from transformers.initialization import no_init_weights  # noqa: E402

from testkit import tiny_model  # noqa: E402

# vision_language_encoder/config.json. text_config: transformers' GlmImageTextConfig defaults
# (documented against zai-org/GLM-Image), the same values ollama's GLM-Image loader records from the
# checkpoint (x/imagegen/models/glm_image/vision_language_encoder.go), which also gives
# rope_parameters (transformers' default is None). max_position_embeddings: transformers' default.
TEXT_CONFIG = dict(
    vocab_size=168064, vision_vocab_size=16512, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
    num_attention_heads=32, num_key_value_heads=2, attention_bias=True, rms_norm_eps=1e-5,
    max_position_embeddings=131072, pad_token_id=167841, eos_token_id=16385,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                     "mrope_section": [8, 12, 12]},
)  # fmt: skip
# vision_config and vq_config: transformers' GlmImageVisionConfig / GlmImageVQVAEConfig defaults
# (documented against zai-org/GLM-Image; no second public source found for them).
VISION_CONFIG = dict(depth=40, hidden_size=1536, num_heads=16, intermediate_size=6144, image_size=2048, patch_size=16,
                     spatial_merge_size=1)  # fmt: skip
VQ_CONFIG = dict(embed_dim=2048, num_embeddings=16384, latent_channels=1536)
# Top-level ids: transformers' GlmImageConfig defaults, as ollama's loader records them.
TOKEN_IDS = dict(image_token_id=167855, image_start_token_id=16384, image_end_token_id=16385)

# transformer/config.json: SGLang's GlmImageArchConfig
# (python/sglang/multimodal_gen/configs/models/dits/glmimage.py) and ollama's transformer.go agree;
# diffusers' own defaults (64 heads x 40) are not the checkpoint's.
DIT_CONFIG = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=128,
                  num_attention_heads=32, text_embed_dim=1472, time_embed_dim=512, condition_dim=256,
                  prior_vq_quantizer_codebook_size=16384)  # fmt: skip

# text_encoder/config.json (the glyph encoder, ByT5-small's encoder): ollama's text_encoder.go.
# Dropout: T5Config's default (inference ignores it).
T5_CONFIG = dict(vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)  # fmt: skip
GLYPH_TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # ByT5Tokenizer's

# vae/config.json: ollama's vae.go, whose comments record the checkpoint's values (FastVideo's
# GlmImageVAEArchConfig lists (128, 256, 512, 512) x 2 instead, which it calls the standard SD ones).
# The 16 latents_mean / latents_std values are not published in any source found: 0 and 1 here.
# sample_size and force_upcast: diffusers' defaults.
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 512, 1024, 1024),
                  layers_per_block=3, norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215, shift_factor=None,
                  latents_mean=[0.0] * 16, latents_std=[1.0] * 16)  # fmt: skip

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
STAMP_FILE = ".real-shape-glm-image"


# -- parameter counts, from the configs ---------------------------------------------------------


def ar_layer_parameters(text: dict = TEXT_CONFIG) -> int:
    """One GLM-4 decoder layer: q/k/v (with biases, GQA), o, fused gate_up + down, four RMSNorms."""
    hidden, heads, kv_heads = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = hidden // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    bias = q_out + 2 * kv_out if text["attention_bias"] else 0
    attention = hidden * (q_out + 2 * kv_out) + bias + q_out * hidden
    mlp = 3 * hidden * text["intermediate_size"]
    return attention + mlp + 4 * hidden


def vision_layer_parameters(vision: dict = VISION_CONFIG) -> int:
    """One ViT block: fused qkv and proj, fc1 and fc2 (all with biases), two LayerNorms."""
    width, inner = vision["hidden_size"], vision["intermediate_size"]
    return 4 * width * width + 4 * width + 2 * width * inner + inner + width + 4 * width


def dit_layer_parameters(dit: dict = DIT_CONFIG) -> int:
    """One single-stream DiT block: AdaLN (time embedding -> 12 modulations), q/k/v/out, a 4x GELU MLP,
    all with biases."""
    width = dit["num_attention_heads"] * dit["attention_head_dim"]
    adaln = dit["time_embed_dim"] * 12 * width + 12 * width
    attention = 4 * (width * width + width)
    mlp = 2 * 4 * width * width + 4 * width + width
    return adaln + attention + mlp


# -- the build ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _allocated(dtype: torch.dtype, device: str):
    """Modules are allocated straight on `device` in `dtype` with their parameters left as they come
    (torch's and transformers' initialisers are no-ops here, they take minutes at this size);
    buffers such as rotary frequencies are still computed by the constructors."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def _init_fast(model: torch.nn.Module) -> None:
    """One cheap pass (uniform_ is several times faster than normal_ on CPU): matrices with std
    1/sqrt(fan_in), norm scales 1, biases 0."""
    for name, parameter in model.named_parameters():
        if parameter.ndim >= 2:
            bound = math.sqrt(3 / parameter[0].numel())
            parameter.uniform_(-bound, bound)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.fill_(1.0)


def ar_config(ar_layers: int, vision_layers: int) -> GlmImageConfig:
    return GlmImageConfig(
        text_config={**TEXT_CONFIG, "num_hidden_layers": ar_layers},
        vision_config={**VISION_CONFIG, "depth": vision_layers},
        vq_config=VQ_CONFIG,
        **TOKEN_IDS,
    )


def build_models(
    ar_layers: int, dit_layers: int, vision_layers: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> dict[str, torch.nn.Module]:
    """The four networks, in eval mode; randomly initialised, except on the meta device (for counting)."""
    with _allocated(dtype, device):
        models = {
            "text_encoder": T5EncoderModel(T5Config(**T5_CONFIG, **GLYPH_TOKEN_IDS)),
            "vision_language_encoder": GlmImageForConditionalGeneration(ar_config(ar_layers, vision_layers)),
            "transformer": GlmImageTransformer2DModel(**{**DIT_CONFIG, "num_layers": dit_layers}),
            "vae": AutoencoderKL(**VAE_CONFIG),
        }
    for model in models.values():
        if isinstance(model, PreTrainedModel):
            model.tie_weights()  # post_init ties T5's embeddings only when the initialisers run
        if device != "meta":
            _init_fast(model)
        model.eval()
    return models


def build_processor() -> GlmImageProcessor:
    """The AR tokenizer, with the two text specials whose ids the config publishes at those ids, in
    the checkpoint's processor."""
    codebook = VQ_CONFIG["num_embeddings"]
    tokenizer = tiny_model.ar_tokenizer(
        codebook, TEXT_CONFIG["vision_vocab_size"],
        pinned_ids={"<|endoftext|>": TEXT_CONFIG["pad_token_id"], "<|image|>": TOKEN_IDS["image_token_id"]},
    )  # fmt: skip
    return tiny_model.glm_processor(tokenizer, codebook, VISION_CONFIG)


def build_pipeline(
    ar_layers: int, dit_layers: int, vision_layers: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> GlmImagePipeline:
    torch.manual_seed(0)
    models = build_models(ar_layers, dit_layers, vision_layers, dtype, device)
    ar_model = models["vision_language_encoder"]
    ar_model.generation_config = tiny_model.generation_config(ar_model.config)
    return GlmImagePipeline(
        tokenizer=ByT5Tokenizer(), processor=build_processor(), scheduler=tiny_model.flow_scheduler(), **models
    )


def write_real_shape(
    out_dir: str | os.PathLike, ar_layers: int, dit_layers: int, vision_layers: int, dtype: str, device: str = "cpu"
) -> bool:
    """Write the model to out_dir; returns False when out_dir already holds this exact build."""
    sources = Path(__file__).read_bytes() + Path(tiny_model.__file__).read_bytes()
    shape = json.dumps([ar_layers, dit_layers, vision_layers, dtype]).encode()
    stamp = hashlib.sha256(sources + shape).hexdigest()

    def build() -> GlmImagePipeline:
        return build_pipeline(ar_layers, dit_layers, vision_layers, DTYPES[dtype], device)

    return tiny_model.write_pipeline(out_dir, build, stamp, STAMP_FILE)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--ar-layers", type=int, default=TEXT_CONFIG["num_hidden_layers"])
    parser.add_argument("--dit-layers", type=int, default=DIT_CONFIG["num_layers"])
    parser.add_argument("--vision-layers", type=int, default=VISION_CONFIG["depth"])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    written = write_real_shape(
        args.out_dir, args.ar_layers, args.dit_layers, args.vision_layers, args.dtype, args.device
    )
    print(
        f"real-shape GLM-Image ({args.ar_layers} AR / {args.dit_layers} DiT / {args.vision_layers} ViT layers, "
        f"{args.dtype}) {'written' if written else 'up to date'} in {args.out_dir} ({time.perf_counter() - started:.1f} s)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
