"""GLM-Image's 3-D M-RoPE positions (t, h, w), as transformers' GlmImageModel.get_rope_index lays them
out, and the encoding that carries them through vLLM's decode loop. Pure torch: no vLLM here.

The layout:
- prompt text: t = h = w = a running cursor, one step per token;
- a condition image's grid (rows x cols) inside the prompt: t = c, h = c + row, w = c + col, with
  c the cursor at the grid's first token; the cursor then advances by max(rows, cols), not by the
  grid's token count;
- the generated grids, in generation order (text-to-image: the preview grid, then the target grid;
  image-to-image: the target grid), laid out the same way from the cursor after the prompt, and
  a final (d, d, d) slot after the last grid.

vLLM computes a decoded token's position as `index in the sequence + delta` with one per-request
delta, the same in t, h and w: linear, which is wrong for GLM-Image from the first decoded token on.
So the model chooses the delta such that decoded token k gets the *encoded* position
`(slot + 1) * stride + k`, where `slot` names the request's decode layout in a small table and
`stride` is a power of two >= max_model_len (every real position is below it), and turns encoded
positions back into the true (t, h, w) at the top of its forward (`resolve_positions`).
"""

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

INT32_LIMIT = 2**31  # vLLM keeps per-request deltas and prompt positions as int32


@dataclass(frozen=True)
class ImagePlacement:
    """A condition image's grid of placeholder tokens in the prompt: `rows * cols` tokens from `offset`."""

    offset: int
    rows: int
    cols: int

    @property
    def length(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class DecodeLayout:
    """Where generated tokens go: `start` is the cursor after the prompt, `grids` the generated
    (rows, cols) grids in generation order (one or two)."""

    start: int
    grids: tuple[tuple[int, int], ...]

    def row(self) -> tuple[int, int, int, int, int]:
        """(start, rows1, cols1, rows2, cols2): the table row; a missing second grid is (0, 0)."""
        (r1, c1), (r2, c2) = (tuple(self.grids) + ((0, 0),))[:2]
        return (self.start, r1, c1, r2, c2)


def prompt_positions(num_tokens: int, images: Sequence[ImagePlacement]) -> tuple[torch.Tensor, int]:
    """[3, num_tokens] int64 positions of a prompt whose condition images sit at `images`, and the
    cursor after the prompt (where the first generated token goes)."""
    positions = torch.empty(3, num_tokens, dtype=torch.int64)
    cursor = 0
    done = 0  # tokens laid out so far
    for image in sorted(images, key=lambda image: image.offset):
        if image.offset < done or image.offset + image.length > num_tokens:
            raise ValueError(f"condition image at {image.offset} (+{image.length}) overlaps or leaves the prompt")
        text = image.offset - done
        positions[:, done : image.offset] = torch.arange(cursor, cursor + text)
        cursor += text
        rows = torch.arange(image.rows).repeat_interleave(image.cols)
        cols = torch.arange(image.cols).repeat(image.rows)
        end = image.offset + image.length
        positions[0, image.offset : end] = cursor
        positions[1, image.offset : end] = cursor + rows
        positions[2, image.offset : end] = cursor + cols
        cursor += max(image.rows, image.cols)
        done = end
    positions[:, done:] = torch.arange(cursor, cursor + num_tokens - done)
    cursor += num_tokens - done
    return positions, cursor


def decode_positions(layout: DecodeLayout, count: int) -> torch.Tensor:
    """[3, count] true positions of generated tokens 0..count-1 (the reference for `resolve_positions`)."""
    columns = []
    cursor = layout.start
    for rows, cols in layout.grids:
        for index in range(rows * cols):
            columns.append((cursor, cursor + index // cols, cursor + index % cols))
        cursor += max(rows, cols)
    columns.extend([(cursor, cursor, cursor)] * max(0, count - len(columns)))
    return torch.tensor(columns[:count], dtype=torch.int64).reshape(-1, 3).T


def parse_decode_grids(
    token_ids: Sequence[int], count: int, grid_bos: int, grid_eos: int, decode: Callable[[list[int]], str]
) -> tuple[tuple[int, int], ...] | None:
    """The grids to generate, in generation order, from a GLM-Image prompt's tail.

    GlmImageProcessor ends a prompt with the grid sizes, `<sop>rows cols<eop>` each, then the image
    start token: text-to-image `<sop>target<eop><sop>preview<eop><start>` (`count` 2, generated
    preview first), image-to-image `<sop>target<eop><start>` (`count` 1). None if the tail is not so.
    """
    grids = []
    end = len(token_ids) - 1  # the image start token
    for _ in range(count):
        if end < 1 or token_ids[end - 1] != grid_eos:
            return None
        start = end - 1
        while start > 0 and token_ids[start - 1] != grid_bos:
            start -= 1
        if start == 0:
            return None
        words = decode(list(token_ids[start : end - 1])).split()
        if len(words) != 2 or not all(word.isdigit() for word in words):
            return None
        grids.append((int(words[0]), int(words[1])))
        end = start - 1
    if any(rows < 1 or cols < 1 for rows, cols in grids):
        return None
    return tuple(grids)  # read backwards: the last grid in the prompt is generated first


def position_stride(max_model_len: int) -> int:
    """The smallest power of two >= max_model_len: every real position is below it."""
    return 1 << max(max_model_len - 1, 1).bit_length()


def layout_capacity(max_model_len: int, limit: int = 1 << 18) -> int:
    """How many decode layouts the encoding can name while every encoded position stays int32."""
    stride = position_stride(max_model_len)
    capacity = (INT32_LIMIT - 1 - max_model_len) // stride - 1
    if capacity < 1:
        raise ValueError(f"max_model_len {max_model_len} leaves no room for encoded decode positions")
    return min(capacity, limit)


class LayoutTable:
    """Interns decode layouts into a fixed number of slots (identical layouts share one).

    vLLM tells a model nothing when a request finishes, so slots are recycled least recently
    interned first: a slot is reused only after `capacity` other distinct layouts were interned
    since its last use, far more than can start while one plan is generated."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._slots: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self._lock = threading.Lock()

    def intern(self, row: tuple[int, ...]) -> tuple[int, bool]:
        """(slot, is_new): when is_new the caller writes `row` into its slot."""
        with self._lock:
            slot = self._slots.get(row)
            if slot is not None:
                self._slots.move_to_end(row)
                return slot, False
            if len(self._slots) < self.capacity:
                slot = len(self._slots)
            else:
                _, slot = self._slots.popitem(last=False)
            self._slots[row] = slot
            return slot, True

    def __len__(self) -> int:
        return len(self._slots)


def decode_delta(layout_slot: int, prompt_length: int, stride: int) -> int:
    """The delta that makes generated token k (sequence index prompt_length + k) land on
    `(slot + 1) * stride + k`."""
    return (layout_slot + 1) * stride - prompt_length


def resolve_positions(positions: torch.Tensor, table: torch.Tensor, stride: int) -> torch.Tensor:
    """[3, n] positions with encoded decode positions -> true (t, h, w). Positions below `stride`
    pass through. `table` rows are (start, rows1, cols1, rows2, cols2). Branch-free and shape-static,
    so it also runs under graph capture when `table` is a persistent buffer."""
    p = positions[0]
    encoded = p >= stride
    relative = (p - stride).clamp(min=0)
    slot = torch.div(relative, stride, rounding_mode="floor").clamp(max=table.shape[0] - 1)
    k = relative - slot * stride
    start, rows1, cols1, rows2, cols2 = table[slot].unbind(-1)
    n1 = rows1 * cols1
    in1 = k < n1
    in2 = ~in1 & (k < n1 + rows2 * cols2)
    start2 = start + torch.maximum(rows1, cols1)
    end = start2 + torch.maximum(rows2, cols2)
    k2 = k - n1
    cols1, cols2 = cols1.clamp(min=1), cols2.clamp(min=1)
    t = torch.where(in1, start, torch.where(in2, start2, end))
    h = torch.where(in1, start + k // cols1, torch.where(in2, start2 + k2 // cols2, end))
    w = torch.where(in1, start + k % cols1, torch.where(in2, start2 + k2 % cols2, end))
    return torch.where(encoded.unsqueeze(0), torch.stack([t, h, w]), positions)
