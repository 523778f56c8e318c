"""The decoder engine interface: what the runner needs from a model implementation.

Every method but `info` blocks and runs in the runner's worker thread, one request's calls in
order: `prepare` (as soon as the spec is valid), `add_conditions` (i2i, once the plan header has
arrived), `decode` (once the plan is complete), `release` (always, last).
"""

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from decoder_service.domain import ConditionPlan, DecodeJob


@dataclass(frozen=True)
class EngineInfo:
    model: str
    engine: str
    plan_format: str
    codebook_size: int


class DecodeCancelled(Exception):
    """`decode` stopped between two steps because `is_cancelled()` said so."""

    def __init__(self, steps_done: int, steps_total: int):
        super().__init__(f"cancelled after {steps_done} of {steps_total} denoising steps")
        self.steps_done = steps_done
        self.steps_total = steps_total


@dataclass
class Decoded:
    image: Image.Image
    denoising_seconds: float
    vae_decode_seconds: float


Prepared = Any  # an engine's own per-request state, opaque to the runner


class DecoderEngine(abc.ABC):
    @property
    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    def load(self) -> None:
        """Loads the model (once, at start-up)."""

    @abc.abstractmethod
    def prepare(self, job: DecodeJob) -> Prepared:
        """Everything that does not need the plan: glyph embeddings, seeded noise, timesteps, the
        condition images decoded and VAE-encoded. Raises InvalidRequest for undecodable images."""

    @abc.abstractmethod
    def add_conditions(self, prepared: Prepared, conditions: Sequence[ConditionPlan]) -> None:
        """Image-to-image: builds the reference KV cache from the condition images and the plan's
        grids. Raises InvalidRequest when a grid does not fit its image."""

    @abc.abstractmethod
    def decode(
        self,
        prepared: Prepared,
        target_ids: Sequence[int],
        on_step: Callable[[int, int], None],
        is_cancelled: Callable[[], bool],
    ) -> Decoded:
        """Denoises (calling `on_step(done, total)` after each step, checking `is_cancelled()` before
        each one and raising DecodeCancelled) and decodes the latents to an RGB image."""

    def release(self, prepared: Prepared) -> None:  # noqa: B027 - optional hook
        """Frees a request's state early (the KV cache); called whatever happened."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases the model at shutdown."""
