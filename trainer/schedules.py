"""Learning-rate schedules: pure functions of the step (0-based, in batches).

Written with keras.ops so the same function runs on a Python int (tests, logs)
and inside the compiled train step on any backend.
"""

import math

import keras
from keras import ops


def warmup(step, lr_after, warmup_learning_rate, warmup_steps):
    """Linear from warmup_learning_rate at step 0 to lr_after at warmup_steps."""
    if warmup_steps == 0:
        return lr_after
    step = ops.cast(step, "float32")
    fraction = ops.minimum(step / warmup_steps, 1.0)
    ramp = warmup_learning_rate + (lr_after - warmup_learning_rate) * fraction
    return ops.where(step < warmup_steps, ramp, lr_after)


def cosine(step, initial_learning_rate, max_steps, warmup_learning_rate=0.0, warmup_steps=0):
    """Cosine decay from initial_learning_rate after warmup to 0 at max_steps."""
    step_f = ops.cast(step, "float32")
    progress = ops.clip((step_f - warmup_steps) / max(max_steps - warmup_steps, 1), 0.0, 1.0)
    decayed = initial_learning_rate * 0.5 * (1.0 + ops.cos(math.pi * progress))
    return warmup(step, decayed, warmup_learning_rate, warmup_steps)


def stepwise(step, initial_learning_rate, boundaries, levels, warmup_learning_rate=0.0, warmup_steps=0):
    """initial_learning_rate before boundaries[0]; levels[i] from boundaries[i] on."""
    step_f = ops.cast(step, "float32")
    lr = ops.convert_to_tensor(initial_learning_rate, "float32")
    for boundary, level in zip(boundaries, levels):
        lr = ops.where(step_f >= boundary, level, lr)
    return warmup(step, lr, warmup_learning_rate, warmup_steps)


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """Binds one of the functions above to its arguments for a Keras optimizer."""

    def __init__(self, decay_type, **kwargs):
        self.decay_type = decay_type
        self.kwargs = kwargs

    def __call__(self, step):
        fn = cosine if self.decay_type == "cosine" else stepwise
        return ops.cast(fn(step, **self.kwargs), "float32")

    def get_config(self):
        return {"decay_type": self.decay_type, **self.kwargs}


def from_config(c, steps_per_epoch):
    """The Schedule a Config asks for (only run() holds the whole Config)."""
    common = dict(
        initial_learning_rate=c.initial_learning_rate,
        warmup_learning_rate=c.warmup_learning_rate,
        warmup_steps=c.warmup_steps,
    )
    if c.learning_rate_decay_type == "cosine":
        return Schedule("cosine", max_steps=c.max_steps, **common)
    return Schedule(
        "stepwise",
        boundaries=list(c.stepwise_learning_rate_steps),
        levels=list(c.stepwise_learning_rate_levels),
        **common,
    )
