"""The decoder engine interface: what the runner needs from a model implementation.

Every method but `info` blocks; the runner calls `read_conditions` in a thread of its own (image
decoding must not hold up other requests' steps) and the others in its single worker thread, one
request's calls in this order: `prepare` (as soon as the spec is valid and its images are read),
`add_conditions` (i2i, once the plan header has arrived), `begin` (once the plan is complete),
`step` once per denoising step (`preview` after one, when a preview is due), `finish` (VAE decode),
and `release` (always, last). The runner checks cancellation and deadlines between two calls, so a
request stops within one step, and the calls of concurrent requests interleave step by step on the
one thread, so that only one step's activations are ever alive.
"""

import abc
from collections.abc import Sequence
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


Prepared = Any  # an engine's own per-request state, opaque to the runner


class DecoderEngine(abc.ABC):
    @property
    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    def load(self) -> None:
        """Loads the model (once, at start-up)."""

    def read_conditions(self, job: DecodeJob) -> list[Image.Image]:
        """The condition images, decoded and sized as the planner sizes them (no device work).
        Raises InvalidRequest for images that cannot be served."""
        return []

    @abc.abstractmethod
    def prepare(self, job: DecodeJob, images: Sequence[Image.Image]) -> Prepared:
        """Everything that does not need the plan: glyph embeddings, seeded noise, timesteps, the
        condition images (from `read_conditions`) VAE-encoded."""

    @abc.abstractmethod
    def add_conditions(self, prepared: Prepared, conditions: Sequence[ConditionPlan]) -> None:
        """Image-to-image: builds the reference KV cache from the condition images and the plan's
        grids. Raises InvalidRequest when a grid does not fit its image."""

    @abc.abstractmethod
    def begin(self, prepared: Prepared, target_ids: Sequence[int]) -> int:
        """Takes the complete target grid (d32, row-major); returns the number of steps."""

    @abc.abstractmethod
    def step(self, prepared: Prepared) -> None:
        """One denoising step; returns once its work is done on the device."""

    @abc.abstractmethod
    def finish(self, prepared: Prepared) -> Image.Image:
        """Decodes the latents into the RGB image."""

    @abc.abstractmethod
    def preview(self, prepared: Prepared, max_side: int) -> Image.Image:
        """After a `step`: the final image as that step estimates it, decoded cheaply at most about
        `max_side` pixels a side. Changes nothing the next steps use."""

    def release(self, prepared: Prepared) -> None:  # noqa: B027 - optional hook
        """Frees a request's state early (the KV cache); called whatever happened."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases the model at shutdown."""
