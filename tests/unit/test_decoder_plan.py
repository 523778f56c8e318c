"""PlanAssembler: a plan is checked chunk by chunk, and fails on the first bad one."""

import pytest

from decoder_service.domain import ConditionPlan, Grid, PlanHeader, PlanSummary, PlanTokens
from decoder_service.plan import PlanAssembler, PlanExpectations
from servekit.errors import IncompatiblePlan, InvalidRequest

pytestmark = pytest.mark.unit

FORMAT = "glm-image/vq64/0123456789abcdef"
WIDTH, HEIGHT = 128, 64  # 2 rows x 4 cols
TOTAL = 8


def expectations(conditions: int = 0) -> PlanExpectations:
    return PlanExpectations(
        width=WIDTH, height=HEIGHT, plan_format=FORMAT, codebook_size=64, condition_images=conditions
    )


def header(**changes) -> PlanHeader:
    fields = dict(
        request_id="r", target_rows=2, target_cols=4, preview_rows=1, preview_cols=2, codebook_size=64,
        plan_format=FORMAT, seed=1, width=WIDTH, height=HEIGHT, conditions=(),
    )  # fmt: skip
    fields.update(changes)
    return PlanHeader(**fields)


def target(offset: int, ids) -> PlanTokens:
    return PlanTokens(Grid.TARGET, offset, tuple(ids))


def preview(offset: int, ids) -> PlanTokens:
    return PlanTokens(Grid.PREVIEW, offset, tuple(ids))


def assemble(*items, conditions: int = 0) -> PlanAssembler:
    assembler = PlanAssembler(expectations(conditions))
    for item in items:
        assembler.add(item)
    return assembler


def test_the_planners_stream_assembles():
    assembler = assemble(
        header(), preview(0, [1, 2]), target(0, [0, 1, 2]), target(3, []), target(3, [3, 4, 5, 6, 7]), PlanSummary()
    )
    assert assembler.complete
    plan = assembler.finish()
    assert plan.target_ids == (0, 1, 2, 3, 4, 5, 6, 7)
    assert plan.header.target_rows == 2


def test_complete_as_soon_as_the_target_grid_is_full():
    assembler = assemble(header(), target(0, range(7)))
    assert not assembler.complete and assembler.received == 7 and assembler.total == TOTAL
    assembler.add(target(7, [63]))
    assert assembler.complete
    assert assembler.plan().target_ids[-1] == 63


def test_header_without_width_and_height_is_accepted():
    assert assemble(header(width=0, height=0), target(0, range(8))).complete


def test_condition_grids_pass_through():
    conditions = (ConditionPlan(2, 3, tuple(range(6))), ConditionPlan(1, 1, (5,)))
    plan = assemble(header(conditions=conditions), target(0, range(8)), conditions=2).finish()
    assert plan.header.conditions == conditions


@pytest.mark.parametrize(
    ("items", "error", "message"),
    [
        ([target(0, range(8))], InvalidRequest, "starts with its header, but a tokens chunk"),
        ([PlanSummary()], InvalidRequest, "but a summary chunk"),
        ([header(), header()], InvalidRequest, "second header"),
        ([header(plan_format="glm-image/vq64/ffffffffffffffff")], IncompatiblePlan, "plan_format"),
        ([header(codebook_size=32)], IncompatiblePlan, "codebook_size 32"),
        ([header(target_rows=4)], InvalidRequest, "target grid is 4x4"),
        ([header(width=256)], InvalidRequest, "the plan is for 256x64"),
        ([header(conditions=(ConditionPlan(1, 1, (0,)),))], InvalidRequest, "made with 1 condition images"),
        ([header(), target(1, [0])], InvalidRequest, "offset 1 leave a gap"),
        ([header(), target(0, [0, 1]), target(1, [1])], InvalidRequest, "offset 1 leave an overlap"),
        ([header(), target(0, range(9))], InvalidRequest, "too many target ids: the grid has 8, this chunk ends at 9"),
        ([header(), target(0, range(8)), target(8, [0])], InvalidRequest, "too many target ids"),
        ([header(), target(0, [1, 64])], InvalidRequest, "target id 64 at offset 1 is out of range"),
        ([header(), PlanTokens(Grid.UNSPECIFIED, 0, (1,))], InvalidRequest, "must name their grid"),
        ([header(), preview(0, [1]), preview(2, [1])], InvalidRequest, "preview tokens at offset 2 leave a gap"),
        ([header(), preview(0, [1, 2, 3])], InvalidRequest, "too many preview ids"),
    ],
)
def test_bad_streams_fail_at_the_bad_chunk(items, error, message):
    assembler = PlanAssembler(expectations())
    for item in items[:-1]:
        assembler.add(item)
    with pytest.raises(error, match=message):
        assembler.add(items[-1])


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (ConditionPlan(2, 2, (0, 1, 2)), "has 3 ids for a 2x2 grid"),
        (ConditionPlan(0, 0, ()), "has 0 ids for a 0x0 grid"),
        (ConditionPlan(1, 2, (0, 99)), r"condition_images\[0\] id 99 at index 1 is out of range"),
    ],
)
def test_bad_condition_grids(condition, message):
    with pytest.raises(InvalidRequest, match=message):
        assemble(header(conditions=(condition,)), conditions=1)


def test_preview_ids_are_not_range_checked():
    # The preview is not decoded; only its offsets and size matter.
    assert assemble(header(), preview(0, [999, 1000]), target(0, range(8))).complete


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "stream closed before the plan header arrived"),
        ([header()], "stream closed before the plan was complete: got 0 of 8 target ids"),
        ([header(), target(0, range(5))], "got 5 of 8 target ids"),
    ],
)
def test_stream_closed_early(items, message):
    with pytest.raises(InvalidRequest, match=message):
        assemble(*items).finish()
