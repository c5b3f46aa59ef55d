"""Learning-rate schedules: pure functions of the step (0-based, in batches),
one per --learning_rate_decay_type, each with the linear warmup in front;
the parser of --learning_rate_strategy (Huawei ModelArts' segment language);
and `from_config`, which binds the schedule a Config asks for to a Keras
LearningRateSchedule for the optimizer.

The functions are written with keras.ops, so the same function runs on a
Python int (tests, logs) and inside the compiled train step on any backend.
Keras is imported inside them, not at the top: config.py parses
--learning_rate_strategy while checking flags, before TensorFlow loads.
"""

import collections
import functools
import math

from trainer.cli import UserError

# One segment of --learning_rate_strategy: from the previous segment's end
# (epoch 0 for the first) to end_epoch (epochs, may be fractional), the rate
# goes from start_rate to end_rate along shape.
Segment = collections.namedtuple("Segment", "end_epoch start_rate end_rate shape")
_ARROWS = {"->": "linear", "=>": "exponential", "~>": "cosine"}
_FLAG = "--learning_rate_strategy"
_FORMS = "is not END:RATE or END:FROM->TO (arrows: -> linear, => exponential, ~> cosine)"


def parse_strategy(text):
    """'5:0.1->0.4,20:0.001' -> (Segment(5.0, 0.1, 0.4, 'linear'), Segment(20.0, 0.001, 0.001, 'constant')).

    Raises UserError naming the flag and the first bad segment (counted from 1).
    """
    segments, previous_end = [], 0.0
    for number, item in enumerate(text.split(","), start=1):
        segment = _parse_segment(number, item.strip())
        if not (math.isfinite(segment.end_epoch) and segment.end_epoch > previous_end):
            raise UserError(f"{_FLAG}: segment {number} {item.strip()!r} ends at epoch {segment.end_epoch:g}; each END "
                            f"must be a number of epochs after the previous one ({previous_end:g})")
        segments.append(segment)
        previous_end = segment.end_epoch
    return tuple(segments)


def _parse_segment(number, item):
    if not item:
        raise UserError(f"{_FLAG}: segment {number} is empty; separate segments with one comma, like '5:0.1->0.4,10:0.4'")
    end_text, _, rates = item.partition(":")
    arrow = next((a for a in _ARROWS if a in rates), "")
    start_text, _, stop_text = rates.partition(arrow) if arrow else (rates, "", rates)
    try:
        end_epoch, start_rate, end_rate = float(end_text), float(start_text), float(stop_text)
    except ValueError:
        raise UserError(f"{_FLAG}: segment {number} {item!r} {_FORMS}") from None
    if not all(math.isfinite(rate) and rate > 0 for rate in (start_rate, end_rate)):
        raise UserError(f"{_FLAG}: segment {number} {item!r}: rates must be positive finite numbers")
    return Segment(end_epoch, start_rate, end_rate, _ARROWS.get(arrow, "constant"))


def warmup(step, lr_after, warmup_learning_rate, warmup_steps):
    """Linear from warmup_learning_rate at step 0 to lr_after at warmup_steps."""
    from keras import ops

    if warmup_steps == 0:
        return lr_after
    step = ops.cast(step, "float32")
    fraction = ops.minimum(step / warmup_steps, 1.0)
    ramp = warmup_learning_rate + (lr_after - warmup_learning_rate) * fraction
    return ops.where(step < warmup_steps, ramp, lr_after)


def cosine(step, initial_learning_rate, max_steps, warmup_learning_rate=0.0, warmup_steps=0):
    """Cosine decay from initial_learning_rate after warmup to 0 at max_steps."""
    from keras import ops

    step_f = ops.cast(step, "float32")
    progress = ops.clip((step_f - warmup_steps) / max(max_steps - warmup_steps, 1), 0.0, 1.0)
    decayed = initial_learning_rate * 0.5 * (1.0 + ops.cos(math.pi * progress))
    return warmup(step, decayed, warmup_learning_rate, warmup_steps)


def stepwise(step, initial_learning_rate, boundaries, levels, warmup_learning_rate=0.0, warmup_steps=0):
    """initial_learning_rate before boundaries[0]; levels[i] from boundaries[i] on (steps)."""
    from keras import ops

    step_f = ops.cast(step, "float32")
    lr = ops.convert_to_tensor(initial_learning_rate, "float32")
    for boundary, level in zip(boundaries, levels):
        lr = ops.where(step_f >= boundary, level, lr)
    return warmup(step, lr, warmup_learning_rate, warmup_steps)


def exponential(step, initial_learning_rate, decay_steps, decay_factor, staircase=False,
                warmup_learning_rate=0.0, warmup_steps=0):
    """initial_learning_rate * decay_factor ** (t / decay_steps), t = steps after warmup; with staircase the
    exponent is floor(t / decay_steps), so the rate drops at t = decay_steps, 2 * decay_steps, ..."""
    from keras import ops

    t = ops.maximum(ops.cast(step, "float32") - warmup_steps, 0.0)
    exponent = ops.floor(t / decay_steps) if staircase else t / decay_steps
    decayed = initial_learning_rate * ops.power(decay_factor, exponent)
    return warmup(step, decayed, warmup_learning_rate, warmup_steps)


def polynomial(step, initial_learning_rate, max_steps, end_learning_rate, decay_power=1.0,
               warmup_learning_rate=0.0, warmup_steps=0):
    """(initial - end) * (1 - t / T) ** decay_power + end, t = steps after warmup, T = max_steps - warmup_steps;
    end_learning_rate from max_steps on."""
    from keras import ops

    progress = ops.clip((ops.cast(step, "float32") - warmup_steps) / max(max_steps - warmup_steps, 1), 0.0, 1.0)
    decayed = (initial_learning_rate - end_learning_rate) * ops.power(1.0 - progress, decay_power) + end_learning_rate
    decayed = ops.where(progress >= 1.0, end_learning_rate, decayed)  # 0 ** 0 is 1: decay_power 0 would never end
    return warmup(step, decayed, warmup_learning_rate, warmup_steps)


def strategy(step, segments, steps_per_epoch, warmup_learning_rate=0.0, warmup_steps=0):
    """The rate at step that segments give: parse_strategy's Segments, or the lists a saved config holds.
    A segment covers steps [previous end, end), its end being end_epoch * steps_per_epoch; the last
    segment's end_rate holds from its end on.

    The ENDs count from step 0, so warmup covers the strategy's first warmup_steps, ramping to the
    strategy's rate at warmup_steps (no jump when the warmup ends).
    """
    from keras import ops

    at = ops.maximum(ops.cast(step, "float32"), float(warmup_steps))
    lr = ops.convert_to_tensor(segments[-1][2], "float32")
    starts = [0.0] + [segment[0] * steps_per_epoch for segment in segments[:-1]]
    # From the last segment back, so that the first segment not yet ended wins.
    for start, (end_epoch, start_rate, end_rate, shape) in reversed(list(zip(starts, segments))):
        end = end_epoch * steps_per_epoch
        fraction = ops.clip((at - start) / (end - start), 0.0, 1.0)
        lr = ops.where(at < end, _interpolate(shape, start_rate, end_rate, fraction), lr)
    return warmup(step, lr, warmup_learning_rate, warmup_steps)


def _interpolate(shape, start_rate, end_rate, fraction):
    """The rate a fraction (0 to 1) of the way through a segment."""
    from keras import ops

    if shape == "linear":
        return start_rate + (end_rate - start_rate) * fraction
    if shape == "exponential":
        return start_rate * ops.power(end_rate / start_rate, fraction)
    if shape == "cosine":
        return end_rate + (start_rate - end_rate) * 0.5 * (1.0 + ops.cos(math.pi * fraction))
    return start_rate  # constant


_FUNCTIONS = {"cosine": cosine, "stepwise": stepwise, "exponential": exponential, "polynomial": polynomial,
              "strategy": strategy}


@functools.cache
def schedule_class():
    """Schedule, the Keras LearningRateSchedule that binds one of the functions above to its arguments.

    Built on first use, as it subclasses a Keras class; registered, so a saved optimizer config loads back.
    """
    import keras

    @keras.saving.register_keras_serializable(package="trainer")
    class Schedule(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, decay_type, **kwargs):
            self.decay_type = decay_type
            self.kwargs = kwargs

        def __call__(self, step):
            return keras.ops.cast(_FUNCTIONS[self.decay_type](step, **self.kwargs), "float32")

        def get_config(self):
            # Plain numbers, strings and lists: the optimizer's config is written as JSON.
            return {"decay_type": self.decay_type, **self.kwargs}

    return Schedule


def from_config(c, steps_per_epoch):
    """The Schedule a Config asks for (only run() holds the whole Config); steps_per_epoch turns epochs into steps."""
    kwargs = dict(warmup_learning_rate=c.warmup_learning_rate, warmup_steps=c.warmup_steps)
    initial = c.initial_learning_rate
    decay_type = c.learning_rate_decay_type
    if decay_type == "cosine":
        kwargs.update(initial_learning_rate=initial, max_steps=c.max_steps)
    elif decay_type == "stepwise":
        kwargs.update(initial_learning_rate=initial, boundaries=list(c.stepwise_learning_rate_steps),
                      levels=list(c.stepwise_learning_rate_levels))
    elif decay_type == "exponential":
        kwargs.update(initial_learning_rate=initial, decay_steps=c.decay_epochs * steps_per_epoch,
                      decay_factor=c.decay_factor, staircase=c.staircase)
    elif decay_type == "polynomial":
        kwargs.update(initial_learning_rate=initial, max_steps=c.max_steps, decay_power=c.decay_power,
                      end_learning_rate=c.end_learning_rate or initial / 1000)
    else:
        kwargs.update(segments=[list(segment) for segment in parse_strategy(c.learning_rate_strategy)],
                      steps_per_epoch=steps_per_epoch)
    return schedule_class()(decay_type, **kwargs)
