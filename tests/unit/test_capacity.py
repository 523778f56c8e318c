"""gateway.capacity against cases worked out by hand (docs/capacity.md has the model)."""

import argparse
import json
import math
import subprocess
import sys

import pytest

from gateway.capacity import Curve, Stage, add_rate_arguments, plan_tokens, predict, size, stages_from_args

pytestmark = pytest.mark.unit

MIX = {"a": 1.0}


def one_at_a_time(seconds: float) -> Stage:
    """A decoder-like stage: one request at a time per pod, `seconds` each."""
    return Stage("decoder", Curve(((1, 1.0),)), {"a": seconds})


def test_plan_tokens_are_preview_plus_target_plus_end():
    assert plan_tokens(1024, 1024) == 256 + 1024 + 1
    assert plan_tokens(2048, 2048) == 256 + 4096 + 1
    assert plan_tokens(256, 256) == 256 + 64 + 1
    # 1024 wide, 512 high: a preview of int(16 / sqrt(2)) x int(16 * sqrt(2)) = 11 x 22, a target of 16 x 32
    assert plan_tokens(1024, 512) == 11 * 22 + 16 * 32 + 1


def test_curve_is_linear_from_zero_and_flat_beyond_its_last_batch():
    curve = Curve(((1, 2.0), (3, 4.0)))
    assert [curve(b) for b in (0.5, 1, 2, 3, 10)] == [1.0, 2.0, 3.0, 4.0, 4.0]
    assert (curve.max_batch, curve.max_rate) == (3, 4.0)
    with pytest.raises(ValueError):
        Curve(((2, 1.0), (1, 2.0)))


def test_one_pod_at_half_load_is_mm1():
    # P(n) = (1 - rho) rho^n with rho = 0.5; the mean time in an M/M/1 queue is 1 / (mu - lambda) = 2 s
    stage = one_at_a_time(1.0)
    occupancy = stage.occupancy(1, 0.5, MIX)
    assert occupancy[:3] == pytest.approx([0.5, 0.25, 0.125])
    prediction = predict([stage], {"decoder": 1}, 0.5, MIX)
    assert prediction.mean_s == pytest.approx(2.0)
    # a request finding n others takes n + 1 s; P(n <= 4) = 1 - 0.5^5 = 0.969 is the first >= 0.95
    assert prediction.p95_s == pytest.approx(5.0)


def test_two_pods_wait_as_erlang_c():
    # M/M/2 at 1 request/s, 1 s each: P(wait) = Erlang C = 1/3, mean wait = C / (2 mu - lambda) = 1/3 s
    stage = one_at_a_time(1.0)
    occupancy = stage.occupancy(2, 1.0, MIX)
    assert sum(occupancy[2:]) == pytest.approx(1 / 3)
    assert predict([stage], {"decoder": 2}, 1.0, MIX).mean_s == pytest.approx(1 + 1 / 3)


def test_a_batch_slows_each_plan_and_the_overflow_waits():
    # one planner: 1 plan/s alone, 2 plans/s with 4 at once; a plan's work is 1
    stage = Stage("planner", Curve(((1, 1.0), (4, 2.0))), {"a": 1.0})
    times = [stage.time(1, MIX, n, "a") for n in range(5)]
    # alone 1 s; 2 at once at 4/3 plans/s: 1.5 s; 3 at 5/3: 1.8 s; 4 at 2: 2 s; the 5th waits for one
    # of the 4 to leave (0.5 s at 2 plans/s), then runs in a batch of 4
    assert times == pytest.approx([1.0, 1.5, 1.8, 2.0, 2.5])


def test_no_pods_can_keep_up_beyond_their_full_rate():
    assert one_at_a_time(1.0).occupancy(2, 2.0, MIX) == []
    assert math.isinf(predict([one_at_a_time(1.0)], {"decoder": 2}, 2.0, MIX).p95_s)


def test_size_adds_pods_until_the_p95_is_met():
    stage = one_at_a_time(1.0)
    # one pod at 0.5/s: p95 5 s (above); two: P(n) = 0.6, 0.3, 0.075, ... -> n <= 2 covers 97.5 %, and a
    # request finding 2 others waits half a service: p95 1.5 s
    assert predict([stage], {"decoder": 2}, 0.5, MIX).p95_s == pytest.approx(1.5)
    assert size([stage], 0.5, MIX, p95_s=3.0) == {"decoder": 2}
    assert size([stage], 0.5, MIX, p95_s=6.0) == {"decoder": 1}
    with pytest.raises(ValueError, match="even idle pods take 1.0 s"):
        size([stage], 0.5, MIX, p95_s=0.9)


def test_two_stages_add_up():
    # nearly idle stages: each request takes its own work in each, 2 s + 3 s
    stages = [Stage("planner", Curve(((1, 0.5),)), {"a": 1.0}), one_at_a_time(3.0)]
    prediction = predict(stages, {"planner": 1000, "decoder": 1000}, 0.001, MIX)
    assert prediction.p50_s == pytest.approx(5.0)
    assert prediction.p95_s == pytest.approx(5.0)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_rate_arguments(parser)
    return parser.parse_args(argv)


def test_rates_from_cluster_throughput_json(tmp_path):
    run = {"planners": 2, "concurrency": 8, "planner_only_plans_per_s": 4.0, "decoder_only_images_per_s": 2.0,
           "size": "256x256", "steps": 8}  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    argv = ["--from-json", str(path), "--decoder", "512x512@8:0.5", "--mix", "256x256@16:3,512x512@8:1"]
    stages, mix = stages_from_args(parse(*argv))
    planner, decoder = stages
    assert mix == {"256x256@16": 0.75, "512x512@8": 0.25}
    assert planner.curve.points == ((4.0, 2.0),)  # 8 plans over 2 planners, 2 plans/s each
    # a 512x512 plan has 256 + 256 + 1 tokens, a 256x256 one 321
    assert planner.work == pytest.approx({"256x256@16": 1.0, "512x512@8": 513 / 321})
    # 256x256 measured at 8 steps (0.5 s): 16 steps take twice as long
    assert decoder.work == pytest.approx({"256x256@16": 1.0, "512x512@8": 2.0})
    with pytest.raises(SystemExit, match="no decoder rate for 1024x1024"):
        stages_from_args(parse("--from-json", str(path), "--mix", "1024x1024@8:1"))


def test_seconds_flags_are_rates_inverted():
    stages, mix = stages_from_args(
        parse("--planner-seconds", "1:20,16:80", "--planner-size", "1024x1024", "--decoder-seconds", "1024x1024@50:10")
    )
    assert mix == {"1024x1024@50": 1.0}
    assert stages[0].curve.points == ((1.0, 0.05), (16.0, 0.2))
    assert stages[1].work == {"1024x1024@50": 10.0}


def test_command_prints_pods_ratio_and_helm_values():
    argv = ["--rate", "0.5", "--p95", "3", "--planner", "1:4", "--planner-size", "256x256",
            "--decoder-seconds", "256x256@8:1"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "gateway.capacity", *argv], capture_output=True, text=True, check=True)
    assert "planner:decoder = 1:2 (1:2.00)" in out.stdout
    assert "decoder:\n  replicas: 2\n  autoscaling:\n    minReplicas: 1\n    maxReplicas: 2" in out.stdout
