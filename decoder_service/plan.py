"""Assembles a plan from its chunk stream and checks it, chunk by chunk, as it arrives.

Pure: no I/O, no torch. A bad chunk raises at once (so a broken plan fails before the planner has
finished writing it); `finish()` at the end of the stream says what was missing.
"""

from dataclasses import dataclass

from decoder_service.domain import Grid, Plan, PlanHeader, PlanItem, PlanSummary, PlanTokens
from servekit.errors import IncompatiblePlan, InvalidRequest
from servekit.validation import SIZE_MULTIPLE


@dataclass(frozen=True)
class PlanExpectations:
    """What the spec and this decoder require of a plan."""

    width: int
    height: int
    plan_format: str
    codebook_size: int
    condition_images: int


def _first_out_of_range(ids, codebook_size: int) -> int | None:
    for index, value in enumerate(ids):
        if value >= codebook_size:
            return index
    return None


class PlanAssembler:
    def __init__(self, expected: PlanExpectations):
        self.expected = expected
        self.header: PlanHeader | None = None
        self._target: list[int] = []
        self._preview_received = 0

    @property
    def total(self) -> int:
        """Target ids the plan must have (known from the spec before the header arrives)."""
        return (self.expected.height // SIZE_MULTIPLE) * (self.expected.width // SIZE_MULTIPLE)

    @property
    def received(self) -> int:
        return len(self._target)

    @property
    def complete(self) -> bool:
        return self.header is not None and self.received == self.total

    def add(self, item: PlanItem) -> None:
        if isinstance(item, PlanHeader):
            self._add_header(item)
        elif self.header is None:
            kind = "tokens" if isinstance(item, PlanTokens) else "summary"
            raise InvalidRequest(f"a plan starts with its header, but a {kind} chunk came first")
        elif isinstance(item, PlanTokens):
            self._add_tokens(item)
        elif not isinstance(item, PlanSummary):
            raise InvalidRequest(f"unexpected plan chunk {type(item).__name__}")

    def _add_header(self, header: PlanHeader) -> None:
        if self.header is not None:
            raise InvalidRequest("the plan has a second header; a plan has exactly one, first")
        want = self.expected
        if header.plan_format != want.plan_format:
            raise IncompatiblePlan(
                f"the plan's plan_format {header.plan_format!r} is not this decoder's {want.plan_format!r}: "
                "it was written in another codebook; send it to a decoder of the same format"
            )
        if header.codebook_size != want.codebook_size:
            raise IncompatiblePlan(
                f"the plan's codebook_size {header.codebook_size} is not this decoder's {want.codebook_size}"
            )
        rows, cols = want.height // SIZE_MULTIPLE, want.width // SIZE_MULTIPLE
        if (header.target_rows, header.target_cols) != (rows, cols):
            raise InvalidRequest(
                f"the plan's target grid is {header.target_rows}x{header.target_cols} (rows x cols) but the spec's "
                f"{want.width}x{want.height} pixels need {rows}x{cols}"
            )
        if (header.width and header.width != want.width) or (header.height and header.height != want.height):
            raise InvalidRequest(
                f"the plan is for {header.width}x{header.height} pixels but the spec asks for {want.width}x{want.height}"
            )
        if len(header.conditions) != want.condition_images:
            raise InvalidRequest(
                f"the plan was made with {len(header.conditions)} condition images but the spec has "
                f"{want.condition_images}; send the same images, in the same order, as planned"
            )
        for index, condition in enumerate(header.conditions):
            if condition.rows < 1 or condition.cols < 1 or len(condition.ids) != condition.rows * condition.cols:
                raise InvalidRequest(
                    f"the plan's condition_images[{index}] has {len(condition.ids)} ids for a "
                    f"{condition.rows}x{condition.cols} grid; it needs rows * cols >= 1 ids"
                )
            bad = _first_out_of_range(condition.ids, want.codebook_size)
            if bad is not None:
                raise InvalidRequest(
                    f"the plan's condition_images[{index}] id {condition.ids[bad]} at index {bad} is out of range: "
                    f"the codebook has {want.codebook_size} entries"
                )
        self.header = header

    def _add_tokens(self, tokens: PlanTokens) -> None:
        if tokens.grid is Grid.TARGET:
            self._target_tokens(tokens)
        elif tokens.grid is Grid.PREVIEW:
            # The preview grid is not decoded; it is still checked to be a well-formed stream.
            assert self.header is not None, "add() takes tokens only after the header"
            size = self.header.preview_rows * self.header.preview_cols
            self._check_run("preview", tokens, self._preview_received, size)
            self._preview_received += len(tokens.ids)
        else:
            raise InvalidRequest("plan tokens must name their grid (GRID_PREVIEW or GRID_TARGET)")

    def _target_tokens(self, tokens: PlanTokens) -> None:
        self._check_run("target", tokens, self.received, self.total)
        bad = _first_out_of_range(tokens.ids, self.expected.codebook_size)
        if bad is not None:
            raise InvalidRequest(
                f"target id {tokens.ids[bad]} at offset {tokens.offset + bad} is out of range: the codebook has "
                f"{self.expected.codebook_size} entries (0..{self.expected.codebook_size - 1})"
            )
        self._target.extend(tokens.ids)

    @staticmethod
    def _check_run(grid: str, tokens: PlanTokens, received: int, size: int) -> None:
        if tokens.offset != received:
            problem = "a gap" if tokens.offset > received else "an overlap"
            raise InvalidRequest(
                f"{grid} tokens at offset {tokens.offset} leave {problem}: the next offset must be {received} "
                "(chunks are contiguous and in order)"
            )
        end = tokens.offset + len(tokens.ids)
        if end > size:
            raise InvalidRequest(f"too many {grid} ids: the grid has {size}, this chunk ends at {end}")

    def plan(self) -> Plan:
        """The plan, once `complete`."""
        if not self.complete or self.header is None:  # complete implies a header
            raise RuntimeError("plan() before the plan is complete")
        return Plan(header=self.header, target_ids=tuple(self._target))

    def finish(self) -> Plan:
        """At the end of the stream: the plan, or what was missing."""
        if self.header is None:
            raise InvalidRequest("stream closed before the plan header arrived")
        if not self.complete:
            raise InvalidRequest(
                f"stream closed before the plan was complete: got {self.received} of {self.total} target ids"
            )
        return self.plan()
