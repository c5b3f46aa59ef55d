"""Learning-rate schedules against hand-computed tables, boundaries included."""

import math

import pytest

from trainer import schedules


def lr(fn, step, **kwargs):
    return float(fn(step, **kwargs))


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),          # warmup starts at warmup_learning_rate
    (5, 0.05),         # halfway up the ramp
    (9, 0.09),
    (10, 0.1),         # warmup over: cosine starts at initial_learning_rate
    (60, 0.05),        # half of the decay: cos(pi/2) -> 0.5 * initial
    (110, 0.0),        # max_steps: fully decayed
    (200, 0.0),        # past max_steps stays at 0
])
def test_cosine_with_warmup(step, expected):
    got = lr(schedules.cosine, step, initial_learning_rate=0.1, max_steps=110, warmup_learning_rate=0.0, warmup_steps=10)
    assert got == pytest.approx(expected, abs=1e-7)


def test_cosine_without_warmup_quarter_point():
    got = lr(schedules.cosine, 25, initial_learning_rate=1.0, max_steps=100)
    assert got == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("step, expected", [
    (0, 0.1), (99, 0.1),        # initial_learning_rate before the first boundary
    (100, 0.008), (199, 0.008),  # first level from its boundary on
    (200, 0.0008), (10_000, 0.0008),
])
def test_stepwise_boundaries(step, expected):
    got = lr(schedules.stepwise, step, initial_learning_rate=0.1, boundaries=[100, 200], levels=[0.008, 0.0008])
    assert got == pytest.approx(expected, rel=1e-6)


def test_stepwise_with_warmup_ramps_from_warmup_rate():
    kwargs = dict(initial_learning_rate=0.1, boundaries=[100], levels=[0.01], warmup_learning_rate=0.02, warmup_steps=4)
    assert [round(lr(schedules.stepwise, s, **kwargs), 6) for s in range(6)] == [0.02, 0.04, 0.06, 0.08, 0.1, 0.1]
