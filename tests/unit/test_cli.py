"""The CLI's progress output: live bars on a terminal, silence in logs and pipes."""

import io

import pytest

from gateway.cli import ProgressBars
from glmimage.v1 import common_pb2

pytestmark = pytest.mark.unit


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(bars: ProgressBars) -> None:
    for done in (32, 64, 80):
        bars(common_pb2.STAGE_PLANNING, done, 80)
    for step in (1, 2, 3, 4):
        bars(common_pb2.STAGE_DECODING, step, 4)
    bars.finish()


def test_a_terminal_gets_one_bar_per_stage():
    terminal = Terminal()
    feed(ProgressBars(terminal))
    text = terminal.getvalue()
    assert "planning" in text and "80/80" in text and "denoising" in text and "4/4" in text


def test_a_log_file_gets_no_progress_lines():
    log = io.StringIO()
    feed(ProgressBars(log))
    assert log.getvalue() == ""
