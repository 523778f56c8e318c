"""A tiny, random, deterministic GLM-Image in the real checkpoint's folder layout, built offline.

Same classes and files as zai-org/GLM-Image, so the real loading code runs on it; its images are
noise. `python -m testkit.tiny_model OUT_DIR` writes it (skipped when OUT_DIR holds this build).

Every constraint that makes the tiny model behave like the real one:
- vision vocab == VQ codebook == DiT prior codebook, so the AR head can only emit codebook ids and
  every plan id is a valid prior index;
- token ids 0..N-1 are `<|dit_token_i|>` codebook tokens, N = image start (the tokenizer's bos),
  N+1 = image end (eos), as in the real vocabulary;
- AR head_dim 64 (vLLM's CPU attention supports it) and mrope_section summing to
  head_dim * partial_rotary_factor / 2;
- large random AR weights (std ~1/sqrt(fan_in) for linear layers, 1 for embeddings): with the usual
  0.02 a tiny AR's greedy plan has a handful of distinct ids and hides position bugs;
- VQ latent_channels == vision hidden size, DiT text_embed_dim == T5 d_model, a 4-level VAE
  (scale 8) with latents_mean/std, DiT patch 2, vision patch 16.
"""

import hashlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    GlmImagePipeline,
    GlmImageTransformer2DModel,
)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    ByT5Tokenizer,
    GenerationConfig,
    GlmImageConfig,
    GlmImageForConditionalGeneration,
    GlmImageImageProcessorPil,
    GlmImageProcessor,
    T5Config,
    T5EncoderModel,
    TokenizersBackend,
)

CODEBOOK_SIZE = 64
SEED = 3  # chosen so greedy plans of every test size have many distinct ids
# Bumped whenever the build changes, so that an existing folder is rebuilt.
BUILD_VERSION = "1"

TEXT_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<eop>", "<|user|>", "<|assistant|>", "<|image|>"]


def _dit_token(i: int) -> str:
    return f"<|dit_token_{i}|>"


def chat_template(codebook_size: int) -> str:
    """The real checkpoint's chat template renders an image item as <start><|image|><end>."""
    image = _dit_token(codebook_size) + "<|image|>" + _dit_token(codebook_size + 1)
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}<|user|>\n{%- else -%}<|assistant|>\n{%- endif -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}" + image + ""
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endfor -%}"
    )


def ar_tokenizer(
    codebook_size: int, vision_vocab_size: int, pinned_ids: dict[str, int] | None = None
) -> TokenizersBackend:
    """Byte-level BPE without merges plus GLM-Image's special tokens.

    Ids 0.. are `<|dit_token_i|>` (the vision vocabulary, at least the codebook + image start/end);
    `pinned_ids` puts some text specials at given ids (the real vocabulary's), the gap before them
    filled with reserved tokens that no text encodes to."""
    pinned_ids = pinned_ids or {}
    image_tokens = [_dit_token(i) for i in range(max(codebook_size + 2, vision_vocab_size))]
    vocab = {token: i for i, token in enumerate(image_tokens)}
    # alphabet() is a set: sort it, or the ids depend on the hash seed
    for token in [*sorted(pre_tokenizers.ByteLevel.alphabet()), *TEXT_SPECIALS]:
        if token not in pinned_ids:
            vocab.setdefault(token, len(vocab))
    for token, token_id in sorted(pinned_ids.items(), key=lambda item: item[1]):
        vocab.update((f"<|reserved_{i}|>", i) for i in range(len(vocab), token_id))
        vocab[token] = token_id
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in image_tokens + TEXT_SPECIALS])
    return TokenizersBackend(
        tokenizer_object=backend,
        bos_token=_dit_token(codebook_size),
        eos_token=_dit_token(codebook_size + 1),
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
        model_max_length=4096,
    )


def glm_processor(tokenizer: TokenizersBackend, codebook_size: int, vision_config: dict) -> GlmImageProcessor:
    """Condition images cut into the vision model's patches, at most its position table's reach."""
    image_processor = GlmImageImageProcessorPil(
        patch_size=vision_config["patch_size"], temporal_patch_size=1, merge_size=vision_config["spatial_merge_size"],
        size={"shortest_edge": 32 * 32, "longest_edge": vision_config["image_size"] ** 2},
    )  # fmt: skip
    return GlmImageProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template(codebook_size)
    )


def generation_config(ar_config: GlmImageConfig) -> GenerationConfig:
    """The real checkpoint's sampling defaults (zai-org README / vLLM-Omni)."""
    return GenerationConfig(
        do_sample=True, temperature=0.9, top_p=0.75, top_k=ar_config.text_config.vision_vocab_size,
        eos_token_id=ar_config.image_end_token_id, pad_token_id=ar_config.text_config.pad_token_id,
        bos_token_id=ar_config.image_start_token_id,
    )  # fmt: skip


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75,
        base_image_seq_len=256, time_shift_type="linear",
    )  # fmt: skip


def _init_large(module: torch.nn.Module, gain: float) -> None:
    """std gain/sqrt(fan_in) for linear weights, 1 for embeddings, small biases."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            torch.nn.init.normal_(sub.weight, std=gain / math.sqrt(sub.in_features))
            if sub.bias is not None:
                torch.nn.init.normal_(sub.bias, std=0.02)
        elif isinstance(sub, torch.nn.Embedding):
            torch.nn.init.normal_(sub.weight, std=1.0)


def build_pipeline() -> GlmImagePipeline:
    """All components, deterministically initialised."""
    torch.manual_seed(SEED)

    glyph_tokenizer = ByT5Tokenizer()
    t5_config = T5Config(
        vocab_size=len(glyph_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=glyph_tokenizer.pad_token_id, eos_token_id=glyph_tokenizer.eos_token_id,
        decoder_start_token_id=0,
    )  # fmt: skip
    text_encoder = T5EncoderModel(t5_config).eval()

    tokenizer = ar_tokenizer(CODEBOOK_SIZE, CODEBOOK_SIZE)
    vision_config = dict(depth=1, hidden_size=64, num_heads=2, intermediate_size=128, image_size=512, patch_size=16,
                         spatial_merge_size=1)  # fmt: skip
    processor = glm_processor(tokenizer, CODEBOOK_SIZE, vision_config)

    token_id = tokenizer.convert_tokens_to_ids
    ar_config = GlmImageConfig(
        text_config=dict(
            vocab_size=((len(tokenizer) + 63) // 64) * 64, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=131072,
            vision_vocab_size=CODEBOOK_SIZE,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [4, 6, 6]},
            pad_token_id=token_id("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=vision_config,
        vq_config=dict(embed_dim=32, num_embeddings=CODEBOOK_SIZE, latent_channels=64),
        image_token_id=token_id("<|image|>"),
        image_start_token_id=tokenizer.bos_token_id,
        image_end_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    ar_model = GlmImageForConditionalGeneration(ar_config).eval()
    # gain 2: with gain 1 greedy plans of this 2-layer model still fall into short loops.
    _init_large(ar_model, gain=2.0)
    ar_model.generation_config = generation_config(ar_config)

    transformer = GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=t5_config.d_model, time_embed_dim=16, condition_dim=8,
        prior_vq_quantizer_codebook_size=CODEBOOK_SIZE,
    ).eval()  # fmt: skip
    # Without this the zero-initialised output layers make every image the same whatever the plan.
    _init_large(transformer, gain=1.0)

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(4, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=256, latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()  # fmt: skip
    return GlmImagePipeline(
        tokenizer=glyph_tokenizer, processor=processor, text_encoder=text_encoder,
        vision_language_encoder=ar_model, vae=vae, transformer=transformer, scheduler=flow_scheduler(),
    )  # fmt: skip


def write_pipeline(
    out_dir: str | os.PathLike, build: Callable[[], GlmImagePipeline], stamp: str, stamp_name: str
) -> bool:
    """Write build()'s pipeline to out_dir, with `stamp` in the file `stamp_name`; returns False (and
    builds nothing) when out_dir already holds that stamp."""
    out = Path(out_dir)
    stamp_file = out / stamp_name
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and swap it in, so a reader never sees a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out.parent))
    try:
        build().save_pretrained(staging, safe_serialization=True)
        (staging / stamp_name).write_text(stamp)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def write_tiny_model(out_dir: str | os.PathLike) -> bool:
    """Write the model to out_dir; returns False when out_dir already holds this exact build."""
    stamp = hashlib.sha256(Path(__file__).read_bytes() + BUILD_VERSION.encode()).hexdigest()
    return write_pipeline(out_dir, build_pipeline, stamp, ".tiny-glm-image")


def describe(model_dir: str | os.PathLike) -> dict:
    """The files and their sha256, for determinism checks."""
    root = Path(model_dir)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m testkit.tiny_model OUT_DIR")
    started = time.perf_counter()
    state = "written" if write_tiny_model(sys.argv[1]) else "up to date"
    print(f"tiny GLM-Image {state} in {sys.argv[1]} ({time.perf_counter() - started:.1f} s)")
