"""GLM-Image's AR stage as a vLLM model, on vLLM's own layers, registered in every vLLM process
through the `vllm.general_plugins` entry point `planner_service.vllm_model:register`.

- The decoder stack is vLLM's GLM-4 (`Glm4Model`) built from the checkpoint's text config, with
  GLM-Image's rotary: M-RoPE over (t, h, w) in neox style (rotate_half), where GLM-4's is GPT-J style.
- The head predicts codebook ids only (`vision_vocab_size` outputs, ids 0..V-1); its logits are
  padded with -inf to the whole vocabulary so that vLLM's sampler features indexed by token id
  (allowed_token_ids, min_tokens, penalties) work unchanged.
- Condition images (image-to-image) arrive already tokenized, as their grids of codebook ids: a
  `torch.long` tensor of shape (rows, cols) per image, given as the request's "image" data, the
  prompt holding rows * cols `<|image|>` tokens for each (as GlmImageProcessor renders it). The
  grid's shape is what places the image's 2-D positions; the ids' embeddings replace the
  placeholders (transformers' GlmImageModel replaces the placeholder ids by the codebook ids before
  embedding: the same thing). As multimodal data the grid also keys vLLM's prefix cache, so two
  images with equal ids but different shapes never share cached blocks.
- Positions: see planner_service.mrope. `get_mrope_input_positions` (vLLM's hook, run in the worker
  that runs `forward`) lays out the prompt and chooses the decode delta that encodes the request's
  decode layout; `forward` resolves encoded positions into the true (t, h, w). vLLM's runner is not
  patched.
"""

import typing
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoTokenizer, BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.logger import init_logger
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.glm4 import Glm4Model
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ModalityDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)
from vllm.sequence import IntermediateTensors

from planner_service.mrope import (
    DecodeLayout,
    ImagePlacement,
    LayoutTable,
    decode_delta,
    layout_capacity,
    parse_decode_grids,
    position_stride,
    prompt_positions,
    resolve_positions,
)

logger = init_logger(__name__)

ARCHITECTURE = "GlmImageForConditionalGeneration"
IMAGE_TOKEN = "<|image|>"


def register() -> None:
    """The `vllm.general_plugins` entry point, run in every vLLM process (engine core and workers
    are spawned, so registering in the planner's own process would not reach them). The class is
    named lazily; it replaces any other model vLLM may know under the checkpoint's architecture."""
    from vllm import ModelRegistry

    registered = ModelRegistry.models.get(ARCHITECTURE)
    if getattr(registered, "module_name", None) != __name__:
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:GlmImageForConditionalGeneration")


# ---------------------------------------------------------------------------------------------
# Condition images: grids of codebook ids
# ---------------------------------------------------------------------------------------------
class CodebookGridItems(ModalityDataItems[list[torch.Tensor], torch.Tensor]):
    """Condition images as (rows, cols) tensors of codebook ids; they bypass any HF processor."""

    def __init__(self, grids: list[torch.Tensor]):
        super().__init__(grids, "image")

    def get_count(self) -> int:
        return len(self.data)

    def get(self, index: int) -> torch.Tensor:
        return self.data[index]

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        return {
            "image_token_ids": torch.cat([grid.reshape(-1) for grid in self.data]),
            "image_grid_thw": torch.tensor([[1, *grid.shape] for grid in self.data], dtype=torch.int64),
        }


class GlmImageDataParser(MultiModalDataParser):
    def _parse_image_data(self, data) -> CodebookGridItems | None:
        if data is None:
            return None
        grids = [data] if isinstance(data, torch.Tensor) else list(data)
        for grid in grids:
            if not (isinstance(grid, torch.Tensor) and grid.ndim == 2 and not grid.is_floating_point()):
                raise ValueError(
                    "GLM-Image takes condition images already tokenized: one integer tensor of shape "
                    "(rows, cols) of codebook ids per image (the checkpoint's ViT + VQ output)"
                )
            if grid.numel() == 0:
                raise ValueError("a condition image's codebook grid is empty")
        return CodebookGridItems([grid.to(torch.int64).cpu() for grid in grids])


def _image_fields(hf_inputs: Mapping[str, torch.Tensor]) -> Mapping[str, MultiModalFieldConfig]:
    grid_thw = hf_inputs.get("image_grid_thw", torch.empty((0, 3), dtype=torch.int64))
    return {
        "image_token_ids": MultiModalFieldConfig.flat_from_sizes("image", grid_thw.prod(-1)),
        "image_grid_thw": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
    }


class GlmImageProcessingInfo(BaseProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return GlmImageDataParser()

    def get_hf_processor(self, **kwargs: object):
        raise NotImplementedError("GLM-Image's condition images reach vLLM already tokenized: no HF processor")

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # A condition grid is sized by the planner's image processor; the prompt bounds it.
        return {"image": seq_len}

    def image_token_id(self) -> int:
        return self.get_hf_config().image_token_id


class GlmImageDummyInputsBuilder(BaseDummyInputsBuilder[GlmImageProcessingInfo]):
    """Profiling inputs: condition images cost an embedding lookup each, whatever their size."""

    GRID = (16, 16)

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * (self.GRID[0] * self.GRID[1]) * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        return {"image": [torch.zeros(self.GRID, dtype=torch.int64)] * mm_counts.get("image", 0)}


class GlmImageMultiModalProcessor(BaseMultiModalProcessor[GlmImageProcessingInfo]):
    # Prompts arrive as token ids (GlmImageProcessor's), so vLLM's front end needs no tokenizer.
    requires_tokenizer = False

    def get_dummy_inputs(self, seq_len: int, mm_counts: Mapping[str, int], mm_options) -> ProcessorInputs:
        builder = self.dummy_inputs
        rows, cols = builder.GRID
        prompt = [self.info.image_token_id()] * (rows * cols) * mm_counts.get("image", 0)
        mm_data = builder.get_dummy_mm_data(seq_len, mm_counts, mm_options)
        return ProcessorInputs(prompt=prompt, mm_data_items=self.info.parse_mm_data(mm_data, validate=False))

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return _image_fields(hf_inputs)

    def _get_prompt_updates(
        self,
        mm_items,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.image_token_id()

        def placeholders(index: int) -> list[int]:
            _, rows, cols = out_mm_kwargs["image"][index]["image_grid_thw"].data.tolist()
            return [image_token_id] * (rows * cols)

        # The prompt already holds each image's rows * cols placeholders: locate them, change nothing.
        return [PromptReplacement(modality="image", target=placeholders, replacement=placeholders)]

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext):
        result = super().apply(inputs, timing_ctx)
        located = sum(place.length for place in result["mm_placeholders"].get("image", []))
        in_prompt = result["prompt_token_ids"].count(self.info.image_token_id())
        if in_prompt != located:
            raise ValueError(
                f"the prompt holds {in_prompt} image placeholders, its condition grids {located}: each "
                "image needs exactly rows * cols placeholders, as GlmImageProcessor writes them"
            )
        return result


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
@MULTIMODAL_REGISTRY.register_processor(
    GlmImageMultiModalProcessor, info=GlmImageProcessingInfo, dummy_inputs=GlmImageDummyInputsBuilder
)
class GlmImageForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE):
    """GLM-Image's autoregressive planner: writes an image's plan as VQ codebook tokens."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.",
            "lm_head.": "lm_head.",
            # The ViT + VQ run in the planner (the decoder needs the condition ids too).
            "model.visual.": None,
            "model.vqmodel.": None,
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return IMAGE_TOKEN if modality.startswith("image") else None

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        text_config = config.text_config
        self.config = config
        self.model_config = vllm_config.model_config

        with self._mark_language_model(vllm_config):
            self.language_model = Glm4Model(
                vllm_config=vllm_config.with_hf_config(text_config, architectures=["Glm4ForCausalLM"]),
                prefix=maybe_prefix(prefix, "language_model"),
            )
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        rotary = get_rope(
            head_dim,
            max_position=text_config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters=text_config.rope_parameters,
        )
        for layer in self.language_model.layers:
            layer.self_attn.rotary_emb = rotary

        self.codebook_logits = text_config.vision_vocab_size
        self.vocab_size = text_config.vocab_size
        self.lm_head = ParallelLMHead(
            self.codebook_logits, text_config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        self.logits_processor = LogitsProcessor(self.codebook_logits)
        self.configure_mm_token_handling(self.vocab_size, [config.image_token_id])

        max_model_len = vllm_config.model_config.max_model_len
        self.stride = position_stride(max_model_len)
        self.layouts = LayoutTable(layout_capacity(max_model_len))
        # A persistent buffer (fixed address) so that captured graphs read the current rows.
        self.register_buffer("layout_rows", torch.zeros(self.layouts.capacity, 5, dtype=torch.int64), persistent=False)
        self.image_start_id = config.image_start_token_id
        # The prompt's text carries the generated grids' sizes ("<sop>rows cols<eop>"): vLLM's front
        # end may run without a tokenizer, so the model loads its own.
        model_config = vllm_config.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer,
            revision=model_config.tokenizer_revision,
            trust_remote_code=model_config.trust_remote_code,
        )
        bos, eos = (
            self.tokenizer.convert_tokens_to_ids(getattr(self.tokenizer, name, None) or default)
            for name, default in (("grid_bos_token", "<sop>"), ("grid_eos_token", "<eop>"))
        )
        self.grid_tokens: tuple[int, int] = (bos, eos)
        logger.info("GLM-Image AR: position stride %d, %d decode layouts", self.stride, self.layouts.capacity)

    # ------------------------------------------------------------------ positions (worker side)
    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """The prompt's positions and the request's decode delta.

        vLLM's model runner V2 passes prompt + generated tokens when it re-adds a preempted request:
        the prompt ends at its last image start token (generated tokens are codebook ids only)."""
        token_ids = list(input_tokens)
        images = [_placement(feature) for feature in mm_features if feature.modality == "image"]
        positions, cursor = prompt_positions(len(token_ids), images)
        if self.image_start_id not in token_ids:  # not a generation prompt: positions as for text
            return positions, cursor - len(token_ids)
        prompt_length = len(token_ids) - token_ids[::-1].index(self.image_start_id)
        grids = parse_decode_grids(
            token_ids[:prompt_length], 1 if images else 2, *self.grid_tokens, self.tokenizer.decode
        )
        if grids is None:
            logger.warning_once("a prompt without GLM-Image's grid sizes before its image start: text positions")
            return positions, cursor - len(token_ids)
        layout = DecodeLayout(start=cursor - (len(token_ids) - prompt_length), grids=grids)
        slot, is_new = self.layouts.intern(layout.row())
        if is_new:
            self.layout_rows[slot] = torch.tensor(layout.row(), dtype=torch.int64)
        delta = decode_delta(slot, prompt_length, self.stride)
        if len(token_ids) > prompt_length:  # generated tokens re-added as prompt: their encoded positions
            positions[:, prompt_length:] = torch.arange(prompt_length, len(token_ids)) + delta
        return positions, delta

    # ------------------------------------------------------------------ forward
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        token_ids = kwargs.get("image_token_ids")
        grid_thw = kwargs.get("image_grid_thw")
        if token_ids is None:
            return []
        sizes = [int(t * h * w) for t, h, w in _as_rows(grid_thw)]
        if isinstance(token_ids, torch.Tensor):
            grids = token_ids.reshape(-1).split(sizes)
        else:
            grids = [ids.reshape(-1) for ids in typing.cast(list[torch.Tensor], token_ids)]
        embed = self.language_model.embed_input_ids
        return tuple(embed(ids.to(self.layout_rows.device)) for ids in grids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if positions.ndim == 2:
            positions = resolve_positions(positions, self.layout_rows, self.stride)
        return self.language_model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is not None and logits.shape[-1] < self.vocab_size:
            logits = nn.functional.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=float("-inf"))
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


def _as_rows(grid_thw) -> list[list[int]]:
    if isinstance(grid_thw, torch.Tensor):
        return grid_thw.reshape(-1, 3).tolist()
    return [list(map(int, torch.as_tensor(grid).reshape(-1).tolist())) for grid in grid_thw]


def _placement(feature: MultiModalFeatureSpec) -> ImagePlacement:
    if feature.data is None or "image_grid_thw" not in feature.data:
        raise ValueError("a GLM-Image condition image reached the model without its grid")
    frames, rows, cols = feature.data["image_grid_thw"].data.tolist()
    if frames != 1 or rows * cols != feature.mm_position.length:
        raise ValueError(f"condition grid {rows}x{cols} does not fill its {feature.mm_position.length} placeholders")
    return ImagePlacement(feature.mm_position.offset, rows, cols)
