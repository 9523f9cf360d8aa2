"""Timings that agree with themselves: paired medians with their spread, the dense model measured once per
sweep, busy-machine flags, and default calibration counts that every built-in model can give.

These run the real clocks (nothing mocked) but assert only how the figures relate, never how fast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tensorfold.compression.evaluate import describe_speed, measure_speedup, paired_timing
from tensorfold.compression.sweep import sweep
from tensorfold.zoo import BuiltinModel, calibration_samples


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_unmocked_speed_measurement_is_self_consistent():
    import tensorfold as tf

    model = tiny()
    small, _ = tf.compress(model, 0.5, methods=("svd",))
    x = torch.randn(8, 16)
    speed = measure_speedup(model, small, x, threads=1, repeats=7, warmup=1)
    assert speed["seconds_original"] > 0 and speed["seconds_compressed"] > 0
    assert speed["speedup_q1"] <= speed["speedup"] <= speed["speedup_q3"]
    assert speed["speedup_median"] == speed["speedup"]  # one figure, not two that disagree
    assert isinstance(speed["noisy"], bool) and speed["repeats"] == 7 and speed["threads"] == 1
    line = describe_speed(speed)
    assert f"{speed['speedup']:.2f}x" in line and "medians" in line and "best of" not in line
    assert "CPU was busy" in describe_speed({**speed, "noisy": True, "load": 3.0})
    assert torch.get_num_threads() >= 1


def test_paired_timing_of_a_model_with_itself_is_centred_on_one():
    model = tiny()
    t = paired_timing(model, model, torch.randn(4, 16), threads=1, repeats=9, warmup=1)
    assert t["ratio_q1"] <= t["ratio"] <= t["ratio_q3"]
    assert t["first_best"] <= t["first_median"] and t["second_best"] <= t["second_median"]


def fake_entry(limit: int) -> BuiltinModel:
    seen = []

    def calibration(n, seed):
        if n > limit:
            raise AssertionError(f"asked {n} of {limit}")
        seen.append(n)
        return [torch.randn(n, 16)]

    return BuiltinModel(
        name="tiny", description="", load=tiny, calibration=calibration,
        evaluate=lambda a, b: {"agreement": 1.0}, example_inputs=lambda n: torch.randn(n, 16),
        extra={"calibration_limit": limit, "seen": seen},
    )


def test_default_calibration_fits_every_corpus_and_says_so():
    entry = fake_entry(40)
    assert calibration_samples(entry, 256) == (40, "tiny has 40 calibration samples; using all of them "
                                                   "(the default asks 256)")
    assert calibration_samples(entry, 30) == (30, None)
    messages = []
    result = sweep(entry, budgets=(0.5,), allocators=("uniform",), methods=("svd",), latency=True, threads=1,
                   batch_size=4, progress=messages.append)
    assert entry.extra["seen"] == [40] and any("using all of them" in m for m in messages)
    point = result.points[0]
    assert result.dense_latency > 0 and point.ratio_spread[0] <= point.speedup <= point.ratio_spread[1]
    assert isinstance(point.noisy, bool)
    with pytest.raises(AssertionError):  # an explicit count is the caller's: not clamped
        sweep(entry, budgets=(0.5,), allocators=("uniform",), methods=("svd",), calib_samples=100, latency=False,
              progress=False)


def test_every_builtin_model_takes_the_default_counts():
    from tensorfold import zoo

    minilm = zoo.get("minilm")
    n, note = calibration_samples(minilm, 256)
    batches = minilm.calibration(n, 0)  # accepted: no "takes 1 to ... sentences" error
    assert sum(len(b["input_ids"]) for b in batches) == n
    assert (n, note) == (256, None)  # its corpus (Wikipedia, scripture, shipped sentences) holds far more
    for name in ("digits-cnn", "resnet20-shapes"):
        assert calibration_samples(zoo.get(name), 256)[0] == 256
