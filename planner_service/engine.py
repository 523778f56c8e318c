"""The engine interface the servicer drives, whatever generates the tokens (vLLM or transformers)."""

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling: None = the checkpoint's generation config."""

    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 = no top-k cut


@dataclass(frozen=True)
class ConditionGrid:
    rows: int
    cols: int
    ids: list[int]  # rows * cols codebook ids, row-major


@dataclass
class PlanJob:
    """One plan to generate, as the engine sees it."""

    request_id: str
    prompt: str
    width: int
    height: int
    seed: int
    sampling: Sampling
    condition_images: list[bytes] = field(default_factory=list)  # as received (PNG, JPEG or WebP)
    images: list[Image.Image] = field(default_factory=list)  # the same, read for the model (imagekit)
    engine_inputs: Any = None  # engine-private: set by prepare(), dropped when generation ends


@dataclass(frozen=True)
class PlanLayout:
    """The grids a job generates, in generation order, and what the prompt costs."""

    preview: tuple[int, int]  # (0, 0) for image-to-image
    target: tuple[int, int]
    prompt_tokens: int
    conditions: list[ConditionGrid]

    @property
    def preview_tokens(self) -> int:
        return self.preview[0] * self.preview[1]

    @property
    def total_tokens(self) -> int:
        return self.preview_tokens + self.target[0] * self.target[1]


class PlanEngine(abc.ABC):
    """Generates plans. `start` loads the model (once); `prepare` tokenizes a job (prompt, grids,
    condition images) and `generate` streams the job's plan tokens; closing the stream early
    (cancellation) aborts the generation and frees its resources."""

    name: str
    codebook_size: int
    default_max_in_flight: int

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def prepare(self, job: PlanJob) -> PlanLayout: ...

    @abc.abstractmethod
    def generate(self, job: PlanJob, layout: PlanLayout) -> AsyncIterator[list[int]]:
        """Yields lists of new token ids: exactly layout.total_tokens codebook ids in all."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raises when the engine cannot serve."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
