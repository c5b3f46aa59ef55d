"""Learning-rate schedules against hand-computed tables, boundaries included; the
--learning_rate_strategy parser and its messages; the Keras schedule from a Config.

Steps are 0-based batches; strategy ENDs are epochs (steps_per_epoch turns them into steps).
"""

import json
import math
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from trainer import config, schedules
from trainer.cli import UserError
from trainer.schedules import Segment


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


# 0.1 halved every 20 steps (t = step - 10, after a 10-step warmup from 0).
@pytest.mark.parametrize("staircase, step, expected", [
    (False, 5, 0.05),                    # on the warmup ramp
    (False, 10, 0.1),                    # first step after warmup: t = 0
    (False, 20, 0.1 * 0.5 ** 0.5),       # t = 10: half a decay period
    (False, 30, 0.05), (False, 50, 0.025),
    (True, 10, 0.1), (True, 29, 0.1),    # t = 19: still the first stair
    (True, 30, 0.05), (True, 49, 0.05),  # t = 20 jumps; t = 39 holds
    (True, 50, 0.025),
])
def test_exponential(staircase, step, expected):
    got = lr(schedules.exponential, step, initial_learning_rate=0.1, decay_steps=20, decay_factor=0.5,
             staircase=staircase, warmup_steps=10)
    assert got == pytest.approx(expected, rel=1e-6)


# From 0.1 to 0.001 over T = 110 - 10 steps after a 10-step warmup.
@pytest.mark.parametrize("power, step, expected", [
    (2.0, 9, 0.09),                              # last warmup step
    (2.0, 10, 0.1),                              # first step after warmup
    (2.0, 60, 0.099 * 0.5 ** 2 + 0.001),         # t/T = 0.5
    (2.0, 109, 0.099 * 0.01 ** 2 + 0.001),       # last step before max_steps
    (2.0, 110, 0.001), (2.0, 500, 0.001),        # end_learning_rate from max_steps on
    (1.0, 60, 0.0505),                           # power 1 is linear
    (0.0, 109, 0.1), (0.0, 110, 0.001),          # power 0 holds, then ends
])
def test_polynomial(power, step, expected):
    got = lr(schedules.polynomial, step, initial_learning_rate=0.1, max_steps=110, end_learning_rate=0.001,
             decay_power=power, warmup_steps=10)
    assert got == pytest.approx(expected, rel=1e-5)


MODELARTS = "5:0.1->0.4,10:0.4=>0.8,15:0.8~>0.001,20:0.001"


@pytest.mark.parametrize("step, expected", [   # 10 steps per epoch: segments end at steps 50, 100, 150, 200
    (0, 0.1), (25, 0.25),
    (49, 0.1 + 0.3 * 49 / 50),     # last step of the linear segment
    (50, 0.4),                     # the step at END starts the next segment
    (75, 0.4 * 2 ** 0.5),          # geometric mean halfway through =>
    (99, 0.4 * 2 ** (49 / 50)),
    (100, 0.8),
    (125, 0.001 + 0.799 * 0.5),    # cosine halfway
    (149, 0.001 + 0.799 * 0.5 * (1 + math.cos(math.pi * 49 / 50))),
    (150, 0.001), (199, 0.001), (200, 0.001), (10_000, 0.001),
])
def test_strategy_modelarts_example(step, expected):
    got = lr(schedules.strategy, step, segments=schedules.parse_strategy(MODELARTS), steps_per_epoch=10)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("text, steps_per_epoch, step, expected", [
    ("1:0.1,2:0.05->0.01", 10, 9, 0.1),        # a constant segment holds to its last step
    ("1:0.1,2:0.05->0.01", 10, 10, 0.05),      # and the next one starts at its END, with a jump
    ("1:0.1,2:0.05->0.01", 10, 19, 0.05 - 0.04 * 0.9),
    ("1:0.1,2:0.05->0.01", 10, 20, 0.01),      # after the last END its final rate holds
    ("1.5:0.2->0.1", 4, 3, 0.15),              # a fractional END: 1.5 epochs of 4 steps end at step 6
    ("1.5:0.2->0.1", 4, 5, 0.2 - 0.1 * 5 / 6),
    ("1.5:0.2->0.1", 4, 6, 0.1), ("1.5:0.2->0.1", 4, 100, 0.1),
])
def test_strategy_segment_ends(text, steps_per_epoch, step, expected):
    got = lr(schedules.strategy, step, segments=schedules.parse_strategy(text), steps_per_epoch=steps_per_epoch)
    assert got == pytest.approx(expected, rel=1e-5)


def test_strategy_warmup_ramps_to_the_strategy_rate_at_its_end():
    # '2:0.4->0.2' at 10 steps per epoch: 0.4 - 0.01 * step; warmup of 4 steps ends at 0.36.
    segments = schedules.parse_strategy("2:0.4->0.2")
    got = [round(lr(schedules.strategy, s, segments=segments, steps_per_epoch=10, warmup_steps=4), 6) for s in range(6)]
    assert got == [0.0, 0.09, 0.18, 0.27, 0.36, 0.35]


def test_parse_strategy_segments():
    assert schedules.parse_strategy(MODELARTS) == (
        Segment(5.0, 0.1, 0.4, "linear"), Segment(10.0, 0.4, 0.8, "exponential"),
        Segment(15.0, 0.8, 0.001, "cosine"), Segment(20.0, 0.001, 0.001, "constant"))
    assert schedules.parse_strategy(" 0.5 : 1e-3 ~> 2e-4 ") == (Segment(0.5, 1e-3, 2e-4, "cosine"),)


@pytest.mark.parametrize("text, message", [
    ("5:0.1,10:0.4=>", "segment 2 '10:0.4=>' is not END:RATE or END:FROM->TO (arrows: -> linear, => exponential"),
    ("5", "segment 1 '5' is not END:RATE"),
    ("5:0.1:0.2", "segment 1 '5:0.1:0.2' is not END:RATE"),
    ("five:0.1", "segment 1 'five:0.1' is not END:RATE"),
    ("5:0.1->0.2->0.3", "segment 1 '5:0.1->0.2->0.3' is not END:RATE"),
    ("5:0.1>0.2", "segment 1 '5:0.1>0.2' is not END:RATE"),
    ("", "segment 1 is empty"),
    ("5:0.1,,10:0.2", "segment 2 is empty"),
    ("5:0.1,", "segment 2 is empty"),
    ("10:0.1,5:0.2", "segment 2 '5:0.2' ends at epoch 5; each END must be a number of epochs after the previous one (10)"),
    ("5:0.1,5:0.2", "segment 2 '5:0.2' ends at epoch 5"),
    ("0:0.1", "segment 1 '0:0.1' ends at epoch 0"),
    ("5:0.1,nan:0.2", "segment 2 'nan:0.2' ends at epoch nan"),
    ("inf:0.1", "segment 1 'inf:0.1' ends at epoch inf"),
    ("5:0.1,10:0", "segment 2 '10:0': rates must be positive finite numbers"),
    ("5:0.1->-0.2", "segment 1 '5:0.1->-0.2': rates must be positive"),
    ("5:inf", "segment 1 '5:inf': rates must be positive"),
    ("5:nan=>0.1", "segment 1 '5:nan=>0.1': rates must be positive"),
])
def test_parse_strategy_errors_name_the_flag_and_segment(text, message):
    with pytest.raises(UserError) as error:
        schedules.parse_strategy(text)
    assert str(error.value).startswith("--learning_rate_strategy: ")
    assert message in str(error.value)


def test_import_loads_no_keras():
    # config.py parses --learning_rate_strategy before TensorFlow is imported; a bad flag must fail fast.
    check = "import trainer.schedules, sys; assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)


def make_config(**flags):
    base = dict(training_data_path="train", validation_data_path="val", num_classes=2, max_steps=110,
                initial_learning_rate=0.1, warmup_steps=10)
    return config.Config(**{**base, **flags})


# (flags, step, rate) at 10 steps per epoch: each decay type's flags reach its function.
FROM_CONFIG = [
    (dict(learning_rate_decay_type="cosine"), 60, 0.05),
    (dict(learning_rate_decay_type="stepwise", stepwise_learning_rate_steps=(50,),
          stepwise_learning_rate_levels=(0.01,)), 50, 0.01),
    (dict(learning_rate_decay_type="exponential", decay_epochs=2.0, decay_factor=0.5, staircase=True), 29, 0.1),
    (dict(learning_rate_decay_type="exponential", decay_epochs=2.0, decay_factor=0.5, staircase=True), 30, 0.05),
    (dict(learning_rate_decay_type="polynomial", decay_power=2.0), 60, 0.0999 * 0.25 + 0.0001),  # end: 0.1/1000
    (dict(learning_rate_decay_type="polynomial", decay_power=2.0), 110, 0.0001),
    (dict(learning_rate_decay_type="polynomial", end_learning_rate=0.01), 60, 0.055),
    (dict(learning_rate_decay_type="strategy", learning_rate_strategy="5:0.1->0.4,10:0.4=>0.8"), 5, 0.08),  # warmup
    (dict(learning_rate_decay_type="strategy", learning_rate_strategy="5:0.1->0.4,10:0.4=>0.8"), 50, 0.4),
    (dict(learning_rate_decay_type="strategy", learning_rate_strategy="5:0.1->0.4,10:0.4=>0.8"), 100, 0.8),
]


def row_id(row):
    return f"{row[0]['learning_rate_decay_type']}-step{row[1]}"


@pytest.mark.parametrize("flags, step, expected", FROM_CONFIG, ids=map(row_id, FROM_CONFIG))
def test_from_config_on_an_int_and_in_a_compiled_step(flags, step, expected):
    schedule = schedules.from_config(make_config(**flags), steps_per_epoch=10)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
    # As in the train step: an int64 step variable inside an XLA-compiled tf.function.
    compiled = tf.function(lambda s: schedule(s), jit_compile=True)
    assert float(compiled(tf.Variable(step, dtype=tf.int64))) == pytest.approx(expected, rel=1e-5)


ONE_PER_DECAY_TYPE = list({row[0]["learning_rate_decay_type"]: row for row in FROM_CONFIG}.values())


@pytest.mark.parametrize("flags, step, expected", ONE_PER_DECAY_TYPE, ids=map(row_id, ONE_PER_DECAY_TYPE))
def test_optimizer_config_round_trips_through_json(flags, step, expected):
    optimizer = keras.optimizers.SGD(learning_rate=schedules.from_config(make_config(**flags), steps_per_epoch=10))
    saved = json.dumps(keras.saving.serialize_keras_object(optimizer))
    loaded = keras.saving.deserialize_keras_object(json.loads(saved))
    loaded.iterations.assign(step)  # the optimizer's learning_rate is its schedule at its iterations (steps)
    assert float(loaded.learning_rate) == pytest.approx(expected, rel=1e-5)
