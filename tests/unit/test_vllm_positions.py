"""GLM-Image's M-RoPE positions (planner_service.mrope) against transformers' own get_rope_index."""

import types

import pytest
import torch
from transformers.models.glm_image.configuration_glm_image import GlmImageConfig
from transformers.models.glm_image.modeling_glm_image import GlmImageModel

from planner_service.mrope import (
    DecodeLayout,
    ImagePlacement,
    LayoutTable,
    decode_delta,
    decode_positions,
    layout_capacity,
    parse_decode_grids,
    position_stride,
    prompt_positions,
    resolve_positions,
)

pytestmark = pytest.mark.unit

# Token ids of a GLM-Image-like vocabulary; digits and the space are spelled out for the grid sizes.
USER, TEXT, START, END, IMAGE, SOP, EOP = 326, 130, 64, 65, 328, 324, 325
CHARS = {**{str(d): 80 + d for d in range(10)}, " ": 286}
NAMES = {v: k for k, v in CHARS.items()}


def decode(ids: list[int]) -> str:
    return "".join(NAMES.get(i, "?") for i in ids)


def grid_text(rows: int, cols: int) -> list[int]:
    return [SOP, *(CHARS[c] for c in f"{rows} {cols}"), EOP]


def glm_prompt(text: int, target, preview=None, conditions=()):
    """Token ids and image_grid_thw as GlmImageProcessor builds them."""
    ids = [USER]
    for rows, cols in conditions:
        ids += [START] + [IMAGE] * (rows * cols) + [END]
    ids += [TEXT] * text + grid_text(*target)
    grids = [(1, r, c) for r, c in conditions] + [(1, *target)]
    if preview is not None:
        ids += grid_text(*preview)
        grids.append((1, *preview))
    return ids + [START], torch.tensor(grids)


def hf_positions(ids: list[int], grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' prompt positions [3, n] and decode positions [3, m] for one prompt."""
    config = GlmImageConfig()
    config.image_start_token_id, config.image_end_token_id = START, END
    model = types.SimpleNamespace(config=config)
    model.get_vision_position_ids = lambda *a, **k: GlmImageModel.get_vision_position_ids(model, *a, **k)
    input_ids = torch.tensor([ids])
    positions, _ = GlmImageModel.get_rope_index(
        model, input_ids, image_grid_thw=grids, images_per_sample=torch.tensor([len(grids)])
    )
    return positions[:, 0], model._cached_decode_position_ids[0]


def placements(ids: list[int], conditions) -> list[ImagePlacement]:
    found, index = [], 0
    for rows, cols in conditions:
        index = ids.index(IMAGE, index)
        found.append(ImagePlacement(index, rows, cols))
        index += rows * cols
    return found


CASES = {
    "t2i 256x256": dict(text=9, target=(8, 8), preview=(16, 16)),
    "t2i 512x256": dict(text=9, target=(8, 16), preview=(11, 22)),
    "t2i 256x512": dict(text=30, target=(16, 8), preview=(22, 11)),
    "i2i one 6x9": dict(text=12, target=(8, 8), conditions=[(6, 9)]),
    "i2i one 9x6": dict(text=12, target=(16, 8), conditions=[(9, 6)]),
    "i2i two": dict(text=5, target=(8, 16), conditions=[(9, 6), (4, 12)]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_prompt_and_decode_positions_equal_transformers(case):
    ids, grids = glm_prompt(**case)
    expected_prompt, expected_decode = hf_positions(ids, grids)
    conditions = case.get("conditions", ())

    positions, start = prompt_positions(len(ids), placements(ids, conditions))
    assert torch.equal(positions, expected_prompt)

    generated = parse_decode_grids(ids, 1 if conditions else 2, SOP, EOP, decode)
    expected_grids = [case["preview"], case["target"]] if not conditions else [case["target"]]
    assert generated == tuple(expected_grids)
    layout = DecodeLayout(start, generated)
    assert torch.equal(decode_positions(layout, expected_decode.shape[1]), expected_decode)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_encoded_decode_positions_resolve_to_the_true_ones(case):
    """What vLLM feeds the model while decoding (delta + sequence index) resolves to transformers'."""
    ids, grids = glm_prompt(**case)
    _, expected_decode = hf_positions(ids, grids)
    conditions = case.get("conditions", ())
    _, start = prompt_positions(len(ids), placements(ids, conditions))
    layout = DecodeLayout(start, parse_decode_grids(ids, 1 if conditions else 2, SOP, EOP, decode))

    stride = position_stride(8192)
    table = torch.zeros(4, 5, dtype=torch.int64)
    table[1] = torch.tensor([0, 3, 3, 2, 2])  # another request's layout in the same batch
    table[2] = torch.tensor(layout.row())
    delta = decode_delta(2, len(ids), stride)
    count = expected_decode.shape[1]
    linear = torch.arange(len(ids), len(ids) + count) + delta  # vLLM: sequence index + delta, in t, h and w
    prompt = torch.arange(5)  # prompt positions of other requests in the batch pass through
    batch = torch.cat([prompt, linear]).expand(3, -1)
    resolved = resolve_positions(batch, table, stride)
    assert torch.equal(resolved[:, :5], batch[:, :5])
    assert torch.equal(resolved[:, 5:], expected_decode)


def test_linear_positions_are_what_breaks_glm_image():
    """The negative control: vLLM's own linear decode positions differ from the first decoded token on."""
    ids, grids = glm_prompt(**CASES["t2i 256x256"])
    _, expected = hf_positions(ids, grids)
    linear = torch.arange(len(ids), len(ids) + expected.shape[1]).expand(3, -1)
    assert torch.equal(linear[:, 0], expected[:, 0])  # the first grid starts where text would continue
    assert not torch.equal(linear[:, 1], expected[:, 1])


def test_grids_are_parsed_only_from_a_glm_image_prompt_tail():
    ids, _ = glm_prompt(**CASES["t2i 512x256"])
    assert parse_decode_grids(ids, 2, SOP, EOP, decode) == ((11, 22), (8, 16))
    assert parse_decode_grids(ids, 3, SOP, EOP, decode) is None  # only two grid sizes in the prompt
    assert parse_decode_grids(ids[:-1], 2, SOP, EOP, decode) is None  # no image start at the end
    assert parse_decode_grids([TEXT] * 5 + [START], 1, SOP, EOP, decode) is None
    edited = ids[:-3] + [CHARS["0"], EOP, START]  # "<sop>11 20<eop>"
    assert parse_decode_grids(edited, 1, SOP, EOP, decode) == ((11, 20),)
    assert parse_decode_grids(ids[:-2] + [TEXT, EOP, START], 1, SOP, EOP, decode) is None  # not a number


def test_condition_images_must_lie_inside_the_prompt_without_overlap():
    with pytest.raises(ValueError):
        prompt_positions(10, [ImagePlacement(8, 2, 2)])
    with pytest.raises(ValueError):
        prompt_positions(20, [ImagePlacement(2, 2, 2), ImagePlacement(4, 2, 2)])


def test_layout_table_shares_identical_layouts_and_recycles_the_oldest():
    table = LayoutTable(capacity=2)
    assert table.intern((5, 2, 2, 0, 0)) == (0, True)
    assert table.intern((6, 2, 2, 0, 0)) == (1, True)
    assert table.intern((5, 2, 2, 0, 0)) == (0, False)  # shared, and now the most recent
    assert table.intern((7, 2, 2, 0, 0)) == (1, True)  # recycles (6, ...), the least recently interned
    assert len(table) == 2


def test_encoded_positions_fit_vllm_int32_buffers():
    assert position_stride(8192) == 8192 and position_stride(8193) == 16384 and position_stride(4096) == 4096
    for max_model_len in (4096, 8192, 32768, 131072):
        capacity = layout_capacity(max_model_len)
        stride = position_stride(max_model_len)
        assert capacity >= 16_000
        highest = (capacity + 1) * stride + max_model_len  # last slot, last generated token
        assert highest < 2**31
