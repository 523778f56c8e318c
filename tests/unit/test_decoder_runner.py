"""DecodeRunner with a scripted engine: overlap with the plan stream, failing fast, cancellation,
deadlines, and the slot freed only once the worker has left the engine."""

import asyncio
import io
import threading
import time

import pytest
from PIL import Image

from decoder_service.domain import (
    Completed,
    ConditionPlan,
    DecodeJob,
    Grid,
    ImageChunk,
    PlanHeader,
    PlanTokens,
    Preview,
    Progress,
)
from decoder_service.engine import DecoderEngine, EngineInfo
from decoder_service.previews import preview_steps
from decoder_service.runner import DecodeRunner, RunnerOptions
from servekit.errors import Busy, DeadlineExceeded, InvalidRequest, NotReady, Overloaded, Preempted, Stalled

pytestmark = pytest.mark.unit

FORMAT = "glm-image/vq64/test"
SIDE = 64  # a 2x2 grid


class ScriptedEngine(DecoderEngine):
    """Records its calls; `step` sleeps `step_seconds` holding `in_engine`."""

    def __init__(self, step_seconds=0.0, fail_prepare=None):
        self.step_seconds = step_seconds
        self.fail_prepare = fail_prepare
        self.calls: list[str] = []
        self.prepared = threading.Event()
        self.conditioned = threading.Event()
        self.in_engine = threading.Lock()
        self.steps_run = 0

    @property
    def info(self):
        return EngineInfo(model="scripted", engine="scripted", plan_format=FORMAT, codebook_size=64)

    def load(self):
        self.calls.append("load")

    def prepare(self, job, images):
        self.calls.append(f"prepare:{job.request_id}")
        if self.fail_prepare:
            raise self.fail_prepare
        self.prepared.set()
        return job

    def add_conditions(self, job, conditions):
        self.calls.append(f"add_conditions:{len(conditions)}")
        self.conditioned.set()

    def begin(self, job, target_ids):
        self.calls.append(f"begin:{len(target_ids)}")
        return job.steps

    def step(self, job):
        with self.in_engine:
            time.sleep(self.step_seconds)
            self.steps_run += 1
            self.calls.append(f"step:{job.request_id}")

    def finish(self, job):
        self.calls.append(f"finish:{job.request_id}")
        return Image.new("RGB", (job.width, job.height), (1, 2, 3))

    def preview(self, job, max_side):
        self.calls.append(f"preview:{job.request_id}")
        return Image.new("RGB", (job.width // 2, job.height // 2), (4, 5, 6))

    def release(self, job):
        self.calls.append(f"release:{job.request_id}")


def job(steps=3, images=(), request_id="r1", previews=0) -> DecodeJob:
    return DecodeJob(
        request_id=request_id, prompt="p", width=SIDE, height=SIDE, seed=1, steps=steps, guidance_scale=1.5,
        condition_images=tuple(images), previews=previews,
    )  # fmt: skip


def header(conditions=()) -> PlanHeader:
    return PlanHeader(
        request_id="r1", target_rows=2, target_cols=2, preview_rows=0, preview_cols=0, codebook_size=64,
        plan_format=FORMAT, seed=1, width=SIDE, height=SIDE, conditions=tuple(conditions),
    )  # fmt: skip


def target(offset=0, ids=(1, 2, 3, 4)) -> PlanTokens:
    return PlanTokens(Grid.TARGET, offset, tuple(ids))


async def started_runner(engine, **options) -> DecodeRunner:
    runner = DecodeRunner(engine, RunnerOptions(warm_up=False, chunk_bytes=100, **options))
    await runner.start()
    return runner


async def collect(runner, decode_job, items, time_remaining=None) -> list:
    return [event async for event in runner.decode(decode_job, items, time_remaining)]


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 5.0), "timed out"


async def until(condition) -> None:
    for _ in range(1000):  # 5 s
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


async def whole_plan():
    yield header()
    yield target()


def run(coroutine, timeout=20):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def test_prepare_runs_while_the_plan_is_still_streaming():
    engine = ScriptedEngine()

    async def main():
        runner = await started_runner(engine)

        async def items():
            yield header()
            await wait_for(engine.prepared)  # the plan is incomplete: prepare must already run
            engine.calls.append("last chunk")
            yield target()

        events = await collect(runner, job(), items())
        await runner.stop()
        return events

    events = run(main())
    assert engine.calls == ["load", "prepare:r1", "last chunk", "begin:4", *["step:r1"] * 3, "finish:r1", "release:r1"]
    assert [e for e in events if isinstance(e, Progress)] == [Progress(1, 3), Progress(2, 3), Progress(3, 3)]
    chunks = [e for e in events if isinstance(e, ImageChunk)]
    assert len(chunks) > 1 and all(len(c.data) <= 100 for c in chunks)
    completed = events[-1]
    assert isinstance(completed, Completed) and completed.plan_tokens == 4
    assert completed.size_bytes == sum(len(c.data) for c in chunks)


def test_reference_kv_cache_is_built_when_the_header_arrives():
    engine = ScriptedEngine()

    async def main():
        runner = await started_runner(engine)

        async def items():
            yield header([ConditionPlan(1, 1, (5,))])
            await wait_for(engine.conditioned)
            engine.calls.append("last chunk")
            yield target()

        await collect(runner, job(images=[b"img"]), items())

    run(main())
    assert engine.calls[1:4] == ["prepare:r1", "add_conditions:1", "last chunk"]


def test_a_failed_prepare_ends_the_call_before_the_plan_is_complete():
    engine = ScriptedEngine(fail_prepare=InvalidRequest("condition_images[0] could not be decoded"))
    never = asyncio.Event()

    async def main():
        runner = await started_runner(engine)

        async def items():
            yield header()
            await never.wait()  # the planner is still writing
            yield target()

        with pytest.raises(InvalidRequest, match="could not be decoded"):
            await collect(runner, job(), items())
        assert runner.admission.in_flight == 0

    run(main())


def test_stream_closed_early_is_invalid():
    async def main():
        runner = await started_runner(ScriptedEngine())

        async def items():
            yield header()
            yield target(ids=(1, 2))

        with pytest.raises(InvalidRequest, match="got 2 of 4 target ids"):
            await collect(runner, job(), items())

    run(main())


def test_a_bad_chunk_while_denoising_stops_the_decode():
    engine = ScriptedEngine(step_seconds=0.01)

    async def main():
        runner = await started_runner(engine)
        first_step = asyncio.Event()

        async def items():
            yield header()
            yield target()
            await first_step.wait()
            yield target(offset=4, ids=(1,))

        events = []
        with pytest.raises(InvalidRequest, match="too many target ids"):
            async for event in runner.decode(job(steps=1000), items()):
                events.append(event)
                first_step.set()
        return events

    events = run(main())
    assert 0 < len(events) < 1000 and engine.steps_run < 1000
    assert engine.calls[-2:] == ["step:r1", "release:r1"]


def test_cancelling_frees_the_slot_only_after_the_worker_left_the_engine():
    engine = ScriptedEngine(step_seconds=0.05)

    async def main():
        runner = await started_runner(engine)

        async def items():
            yield header()
            yield target()

        async def consume():
            async for event in runner.decode(job(steps=1000), items()):
                if isinstance(event, Progress) and event.done == 2:
                    second_step.set()

        second_step = asyncio.Event()
        task = asyncio.create_task(consume())
        await second_step.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the slot is free and the engine idle: no step of the cancelled call runs any more
        assert runner.admission.in_flight == 0
        assert engine.in_engine.acquire(blocking=False)
        engine.in_engine.release()
        steps = engine.steps_run
        await asyncio.sleep(0.15)
        assert engine.steps_run == steps < 1000

    run(main())
    assert engine.calls[-2:] == ["step:r1", "release:r1"]


def test_deadline_between_steps():
    engine = ScriptedEngine(step_seconds=0.02)

    async def main():
        runner = await started_runner(engine)

        async def items():
            yield header()
            yield target()

        with pytest.raises(DeadlineExceeded, match="of 1000 denoising steps"):
            await collect(runner, job(steps=1000), items(), time_remaining=0.2)

    run(main())
    assert engine.steps_run < 1000


def test_not_ready_before_start():
    runner = DecodeRunner(ScriptedEngine(), RunnerOptions(warm_up=False))
    with pytest.raises(NotReady):
        runner.info  # noqa: B018


def test_warm_up_decodes_once_before_ready():
    engine = ScriptedEngine()

    async def main():
        runner = DecodeRunner(engine, RunnerOptions(warm_up=True, warm_up_side=64))
        await runner.start()
        return runner.info

    assert run(main()).plan_format == FORMAT
    assert engine.calls == ["load", "prepare:warm-up", "begin:4", "step:warm-up", "finish:warm-up", "release:warm-up"]


def test_concurrent_calls_share_the_worker_step_by_step():
    """With two slots, a call waiting for its plan costs nothing, its preparation runs between the
    other's steps, and once both denoise their steps alternate."""
    engine = ScriptedEngine(step_seconds=0.01)

    async def main():
        runner = await started_runner(engine, max_concurrent_decodes=2)
        b_plan_done = asyncio.Event()

        async def items_a():
            yield header()
            yield target()

        async def items_b():
            yield header()
            await b_plan_done.wait()
            yield target()

        b = None
        async for event in runner.decode(job(steps=30, request_id="a"), items_a()):
            if isinstance(event, Progress) and event.done == 3:
                b = asyncio.create_task(collect(runner, job(steps=5, request_id="b"), items_b()))
            if isinstance(event, Progress) and event.done == 10:
                b_plan_done.set()
        await b

    run(main())
    calls = engine.calls
    prepare_b = calls.index("prepare:b")
    assert calls[prepare_b - 1] == calls[prepare_b + 1] == "step:a"  # between two of a's steps
    b_steps = [i for i, call in enumerate(calls) if call == "step:b"]
    assert len(b_steps) == 5
    assert all(calls[i - 1] == "step:a" for i in b_steps[1:])  # then one step each, alternating
    assert calls.index("release:b") < calls.index("finish:a")  # the short one was not held up


def test_a_call_waiting_for_its_plan_holds_no_denoising_slot():
    """One slot: a call whose plan is still streaming must not keep a call with a complete plan waiting."""
    engine = ScriptedEngine()
    release_slow = asyncio.Event()

    async def main():
        runner = await started_runner(engine, max_concurrent_decodes=1, max_queued=2)

        async def slow_items():
            yield header()
            await release_slow.wait()
            yield target()

        async def fast_items():
            yield header()
            yield target()

        slow = asyncio.create_task(collect(runner, job(request_id="slow"), slow_items()))
        await wait_for(engine.prepared)
        fast = await collect(runner, job(request_id="fast"), fast_items())
        assert isinstance(fast[-1], Completed) and not slow.done()
        assert (runner.admission.in_flight, runner.admission.queued) == (0, 1)  # slow: prepared, no slot
        release_slow.set()
        assert isinstance((await slow)[-1], Completed)

    run(main())
    assert engine.calls.index("finish:fast") < engine.calls.index("step:slow")


def test_calls_beyond_the_waiting_places_are_refused_at_once():
    never = asyncio.Event()

    async def main():
        runner = await started_runner(ScriptedEngine(), max_concurrent_decodes=1, max_queued=1)

        async def waiting_items():
            yield header()
            await never.wait()

        waiting = asyncio.create_task(collect(runner, job(request_id="waiting"), waiting_items()))
        while runner.admission.queued == 0:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="at capacity"):
            await collect(runner, job(request_id="refused"), waiting_items())
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert runner.admission.queued == 0

    run(main())


def test_a_plan_that_stops_arriving_ends_the_call_and_frees_its_place():
    never = asyncio.Event()

    async def main():
        runner = await started_runner(ScriptedEngine(), plan_stall_timeout_s=0.3)

        async def stalled_items():
            yield header()
            await never.wait()

        started = time.monotonic()
        with pytest.raises(Stalled, match="no plan chunk arrived for 0.3 s"):
            await collect(runner, job(), stalled_items())
        assert time.monotonic() - started < 2.0
        assert (runner.admission.in_flight, runner.admission.queued) == (0, 0)

    run(main())


def test_a_complete_plan_waiting_for_a_slot_sends_heartbeats():
    engine = ScriptedEngine(step_seconds=0.2)

    async def main():
        runner = await started_runner(engine, max_concurrent_decodes=1, heartbeat_s=0.1)

        async def items():
            yield header()
            yield target()

        busy = asyncio.create_task(collect(runner, job(steps=3, request_id="busy"), items()))
        while runner.admission.in_flight == 0:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.01)
        waiting = await collect(runner, job(steps=2, request_id="waiting"), items())
        await busy
        return waiting

    events = run(main())
    progress = [e for e in events if isinstance(e, Progress)]
    heartbeats = [p for p in progress if p.done == 0]
    assert len(heartbeats) >= 2 and all(p.total == 2 for p in heartbeats)
    assert progress[len(heartbeats) :] == [Progress(1, 2), Progress(2, 2)]


def test_steps_that_cannot_meet_the_deadline_are_refused_before_taking_a_slot():
    engine = ScriptedEngine(step_seconds=0.2)

    async def main():
        runner = await started_runner(engine)

        async def items():
            yield header()
            yield target()

        await collect(runner, job(steps=1, request_id="measure"), items())  # the runner learns the step time
        steps_before = engine.steps_run
        with pytest.raises(DeadlineExceeded, match="denoising steps take about"):
            await collect(runner, job(steps=10, request_id="late"), items(), time_remaining=1.0)
        assert engine.steps_run == steps_before

    run(main())


def test_condition_images_are_read_off_the_worker_thread():
    """Decoding a large photo must not hold up another call's denoising steps on the worker."""
    engine = ScriptedEngine(step_seconds=0.01)
    stepped = threading.Event()
    scripted_step = engine.step

    def step(prepared):
        scripted_step(prepared)
        stepped.set()

    def read_conditions(decode_job):
        assert stepped.wait(5), "the other call's steps waited for this call's image decoding"
        return ["decoded image"]

    engine.step, engine.read_conditions = step, read_conditions

    async def main():
        runner = await started_runner(engine)

        async def items(conditions=()):
            yield header(conditions)
            yield target()

        busy = asyncio.create_task(collect(runner, job(steps=20, request_id="busy"), items()))
        photo = await collect(runner, job(images=[b"photo"], request_id="photo"), items([ConditionPlan(1, 1, (5,))]))
        await busy
        return photo

    assert isinstance(run(main())[-1], Completed)


@pytest.mark.parametrize(
    ("total", "wanted", "steps"),
    [(8, 1, [4]), (8, 2, [3, 5]), (8, 3, [2, 4, 6]), (50, 2, [17, 33]), (3, 3, [1, 2]), (1, 2, []), (8, 0, [])],
)
def test_denoising_previews_are_spread_over_the_steps_before_the_last(total, wanted, steps):
    assert preview_steps(total, wanted) == steps


def test_denoising_previews_come_between_steps_and_leave_the_image_unchanged():
    engine = ScriptedEngine()

    async def main():
        runner = await started_runner(engine)
        with_previews = await collect(runner, job(steps=8, previews=2), whole_plan())
        without = await collect(runner, job(steps=8, request_id="r2"), whole_plan())
        await runner.stop()
        return with_previews, without

    with_previews, without = run(main())
    kinds = [f"{type(e).__name__}{getattr(e, 'done', '')}" for e in with_previews if not isinstance(e, ImageChunk)]
    assert kinds == [*(f"Progress{i}" for i in range(1, 4)), "Preview", "Progress4", "Progress5", "Preview",
                     "Progress6", "Progress7", "Progress8", "Completed"]  # fmt: skip
    previews = [e for e in with_previews if isinstance(e, Preview)]
    assert [(p.index, p.width, p.height) for p in previews] == [(0, SIDE // 2, SIDE // 2), (1, SIDE // 2, SIDE // 2)]
    assert Image.open(io.BytesIO(previews[0].data)).size == (SIDE // 2, SIDE // 2)
    assert with_previews[-1].previews == 2 and with_previews[-1].timings.previews_seconds > 0
    assert with_previews[-1].sha256 == without[-1].sha256 and without[-1].previews == 0
    assert engine.calls.count("preview:r1") == 2 and "preview:r2" not in engine.calls


def test_denoising_previews_are_skipped_while_another_plan_waits_for_the_slot():
    engine = ScriptedEngine(step_seconds=0.02)

    async def main():
        runner = await started_runner(engine, max_concurrent_decodes=1)
        first = asyncio.create_task(collect(runner, job(steps=8, previews=3, request_id="a"), whole_plan()))
        await until(lambda: engine.steps_run >= 1)
        second = await collect(runner, job(steps=2, request_id="b"), whole_plan())
        return await first, second

    first, second = run(main())
    assert isinstance(second[-1], Completed)
    assert first[-1].previews == 0 and not [e for e in first if isinstance(e, Preview)]
    assert "preview:a" not in engine.calls


def preview_job(request_id="p", steps=4) -> DecodeJob:
    return DecodeJob(request_id=request_id, prompt="p", width=SIDE, height=SIDE, seed=1, steps=steps,
                     guidance_scale=1.5, condition_images=())  # fmt: skip


def test_a_plan_preview_renders_on_an_idle_decoder():
    engine = ScriptedEngine()

    async def main():
        runner = await started_runner(engine)
        return await runner.render_preview(preview_job(), (1, 2, 3, 4))

    preview = run(main())
    assert (preview.index, preview.width, preview.height) == (0, SIDE, SIDE)
    assert Image.open(io.BytesIO(preview.data)).size == (SIDE, SIDE)
    assert engine.calls[1:] == ["prepare:p", "begin:4", *["step:p"] * 4, "finish:p", "release:p"]


def test_a_plan_preview_is_refused_while_the_decoder_has_a_call():
    engine = ScriptedEngine(step_seconds=0.02)

    async def main():
        runner = await started_runner(engine)
        decode = asyncio.create_task(collect(runner, job(steps=10), whole_plan()))
        await until(lambda: engine.steps_run >= 1)
        with pytest.raises(Busy, match="has 1 decode call"):
            await runner.render_preview(preview_job(), (1, 2, 3, 4))
        await decode

    run(main())


def test_a_plan_preview_stops_when_a_plan_completes_and_the_full_image_goes_first():
    engine = ScriptedEngine(step_seconds=0.02)

    async def main():
        runner = await started_runner(engine)
        preview = asyncio.create_task(runner.render_preview(preview_job(steps=50), (1, 2, 3, 4)))
        await until(lambda: engine.steps_run >= 2)
        events = await collect(runner, job(steps=2, request_id="full"), whole_plan())
        with pytest.raises(Preempted):
            await preview
        return events

    events = run(main())
    assert isinstance(events[-1], Completed)
    calls = engine.calls
    assert calls.count("step:p") < 10 and "finish:p" not in calls
    assert calls.index("release:p") < calls.index("step:full")  # stopped before the full image's first step


def test_a_cancelled_plan_preview_stops_within_a_step_and_frees_its_place():
    engine = ScriptedEngine(step_seconds=0.02)

    async def main():
        runner = await started_runner(engine)
        preview = asyncio.create_task(runner.render_preview(preview_job(steps=50), (1, 2, 3, 4)))
        await until(lambda: engine.steps_run >= 2)
        preview.cancel()
        with pytest.raises(asyncio.CancelledError):
            await preview
        await until(lambda: "release:p" in engine.calls)
        return await runner.render_preview(preview_job(request_id="q", steps=1), (1, 2, 3, 4))

    assert run(main()).width == SIDE
    assert engine.calls.count("step:p") < 10
