"""The metric_learning head and margin losses: values at hand-computed angles, gradients at the edges,
weights, PAI's defaults, a tiny training per loss, and the class-sharded head on four CPU devices."""

import math

import keras
import numpy as np
import pytest

from tests.conftest import run_on_jax_devices
from trainer import margins
from trainer.cli import UserError

MARGIN_LOSSES = [name for name in margins.DEFAULTS if name != "softmax"]


def cosines_at(target_degrees, other_degrees):
    """Two-class head output for one image of class 0: its angles to the two centres."""
    return np.array([[math.cos(math.radians(target_degrees)), math.cos(math.radians(other_degrees))]], np.float32)


def per_image(loss, labels, y_pred):
    return keras.ops.convert_to_numpy(loss.call(np.asarray(labels, np.float32), keras.ops.convert_to_tensor(y_pred)))


def gradients(fn, *arrays):
    """d fn / d each array, on either backend."""
    arrays = [keras.ops.convert_to_tensor(np.asarray(a, np.float32)) for a in arrays]
    if keras.backend.backend() == "jax":
        import jax

        return [np.asarray(g) for g in jax.grad(fn, argnums=tuple(range(len(arrays))))(*arrays)]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(arrays)
        value = fn(*arrays)
    return [g.numpy() for g in tape.gradient(value, arrays)]


def test_head_gives_cosines_then_plain_logits_in_float32():
    head = margins.MarginHead(2, plain_classifier=True)
    head.build((None, 2))
    head.set_weights([np.array([[1, 0], [0, 2]], np.float32), np.array([[1, 0], [0, 1]], np.float32),
                      np.array([0.5, -0.5], np.float32)])
    assert [v.path for v in head.weights] == ["logits/kernel", "logits/plain_kernel", "logits/plain_bias"]
    out = keras.ops.convert_to_numpy(head(np.array([[3, 4]], np.float32)))
    np.testing.assert_allclose(out, [[0.6, 0.8, 3.5, 3.5]], rtol=1e-6)  # |x| = 5; centres (1, 0) and (0, 1)
    assert margins.MarginHead.from_config(head.get_config()).get_config() == head.get_config()
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        assert margins.MarginHead(3)(np.ones((1, 4), np.float16)).dtype == "float32"
    finally:
        keras.config.set_dtype_policy(policy)


M = math.radians(28.6)  # ArcFace's default margin in radians


@pytest.mark.parametrize("name, target_degrees, target_logit", [
    ("amsoftmax", 60, 30 * (0.5 - 0.4)),
    ("cosface", 60, 64 * (0.5 - 0.35)),
    ("arcface", 60, 64 * math.cos(math.radians(60 + 28.6))),
    ("arcface", 170, 64 * (math.cos(math.radians(170)) - M * math.sin(M))),  # theta + m > 180 deg
    ("large_margin", 30, math.cos(math.radians(120))),  # m theta = 120 deg: k = 0
    ("large_margin", 60, -math.cos(math.radians(240)) - 2),  # k = 1: -(-0.5) - 2 = -1.5
    ("sphereface", 100, math.cos(math.radians(400)) - 4),  # k = 2
    ("sphereface", 180, -7),  # k = 3: -cos(720 deg) - 6, the lowest psi (1 - 2m)
    ("softmax", 60, 64 * 0.5),
])
def test_loss_at_hand_computed_angles(name, target_degrees, target_logit):
    loss = margins.margin_loss(name, 2)
    other_logit = margins.DEFAULTS[name][0] * 0.5  # the other centre at 60 degrees, no margin
    expected = math.log1p(math.exp(other_logit - target_logit))  # two-class softmax cross-entropy
    assert per_image(loss, [[0]], cosines_at(target_degrees, 60))[0] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_the_margin_raises_the_loss_of_every_image(name):
    rng = np.random.default_rng(0)
    cosines = rng.uniform(-0.99, 0.99, size=(64, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(64, 1))
    no_margin = 1 if name in ("large_margin", "sphereface") else 0
    with_margin = per_image(margins.margin_loss(name, 5), labels, cosines)
    assert np.all(with_margin > per_image(margins.margin_loss(name, 5, margin=no_margin), labels, cosines))


@pytest.mark.parametrize("name", list(margins.DEFAULTS))
def test_gradients_are_finite_at_cos_one_minus_one_and_past_pi(name):
    # The target's cosine at 1, -1, past pi - m, at pi - m and just past 1 (rounding); the other class's
    # cosine equal to it, so that the loss is not saturated and its gradient reaches the target's.
    edges = np.repeat([[1.0], [-1.0], [math.cos(math.pi - M / 2)], [math.cos(math.pi - M)], [1.0000001]], 2, axis=1)
    loss = margins.margin_loss(name, 2)
    (grad,) = gradients(lambda p: loss(np.zeros((5, 1), np.float32), p), edges)
    assert np.all(np.isfinite(grad))
    # Through the head: an input on a centre, opposite it, and a zero input.
    head = margins.MarginHead(2)
    head.build((None, 2))
    kernel = np.array([[1, 0], [0, 1]], np.float32)
    inputs = np.array([[1, 0], [-1, 0], [0, 0]], np.float32)
    head_loss = lambda k, x: loss(np.zeros((3, 1), np.float32), head.stateless_call([k], [], x)[0])
    assert all(np.all(np.isfinite(g)) for g in gradients(head_loss, kernel, inputs))


def test_sample_weights_weigh_each_image():
    loss = margins.margin_loss("cosface", 3)
    cosines = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.0, 0.8, 0.1]], np.float32)
    labels = np.array([[0], [2], [0]], np.float32)
    weights = np.array([1.0, 0.0, 3.0], np.float32)
    expected = (per_image(loss, labels, cosines) * weights).sum() / 3  # Keras' mean over the batch
    assert float(loss(labels, cosines, sample_weight=weights)) == pytest.approx(expected, rel=1e-5)


def test_loss_weight_mixes_the_margin_loss_with_the_plain_cross_entropy():
    rng = np.random.default_rng(1)
    cosines = rng.uniform(-1, 1, size=(4, 3)).astype(np.float32)
    plain = rng.normal(size=(4, 3)).astype(np.float32)
    labels = np.array([[0], [1], [2], [1]])
    cross_entropy = np.log(np.exp(plain).sum(axis=1)) - plain[np.arange(4), labels[:, 0]]
    margin_only = per_image(margins.margin_loss("arcface", 3), labels, cosines)
    mixed = per_image(margins.margin_loss("arcface", 3, loss_weight=0.3), labels, np.hstack([cosines, plain]))
    np.testing.assert_allclose(mixed, 0.3 * margin_only + 0.7 * cross_entropy, rtol=1e-5)
    with pytest.raises(ValueError, match="plain_classifier=True"):
        per_image(margins.margin_loss("arcface", 3, loss_weight=0.3), labels, cosines)


def test_defaults_are_pais_recommendations():
    numbers = {name: (scale, margin) for name, (scale, margin, _) in margins.DEFAULTS.items()}
    assert numbers == {"amsoftmax": (30, 0.4), "arcface": (64, 28.6), "cosface": (64, 0.35),
                       "large_margin": (1, 4), "sphereface": (1, 4), "softmax": (64, 0)}
    assert math.radians(28.6) == pytest.approx(0.5, abs=1e-3)
    assert "degrees" in margins.DEFAULTS["arcface"][2] and "cosine" in margins.DEFAULTS["cosface"][2]
    assert all("integer" in margins.DEFAULTS[name][2] for name in ("large_margin", "sphereface"))
    loss = margins.margin_loss("arcface", 10)
    assert (loss.scale, loss.margin) == (64, 28.6)


@pytest.mark.parametrize("arguments, message", [
    ({"metric_loss": "triplet"}, "choose one of amsoftmax, arcface"),
    ({"metric_loss": "sphereface", "margin": 2.5}, "whole number"),
    ({"metric_loss": "arcface", "margin": 200}, "degrees"),
    ({"metric_loss": "softmax", "margin": 0.3}, "softmax has no margin"),
    ({"margin": -0.1}, "must be >= 0"),
    ({"scale": 0}, "must be positive"),
    ({"loss_weight": 1.5}, "in \\[0, 1\\]"),
])
def test_bad_arguments_are_refused_with_their_meaning(arguments, message):
    with pytest.raises(UserError, match=message):
        margins.margin_loss(**{"metric_loss": "cosface", "num_classes": 3, **arguments})


@pytest.mark.parametrize("name", list(margins.DEFAULTS))
def test_each_loss_trains_the_cosines_to_pick_the_class(name):
    # Four separable clusters in 8-D; 200 Adam steps of a dense neck and the head.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 3

    def clusters(n):
        labels = rng.integers(0, 4, n)
        return (centres[labels] + rng.normal(size=(n, 8))).astype(np.float32), labels

    inputs = keras.Input((8,))
    embedding = keras.layers.UnitNormalization(name="embedding")(keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, margins.MarginHead(4)(embedding))
    model.compile(keras.optimizers.Adam(0.01), margins.margin_loss(name, 4))
    x, labels = clusters(256)
    model.fit(x, labels[:, None].astype(np.float32), batch_size=32, epochs=25, verbose=0)
    x, labels = clusters(256)
    assert (model.predict(x, verbose=0).argmax(axis=1) == labels).mean() >= 0.97


SHARDED_HEAD = """
import json
import jax
import keras
import numpy as np
from trainer import margins

C, D, B = 8, 6, 8  # D != B: a gathered kernel f32[6,8] and gathered embeddings f32[8,6] read apart
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(B, D)).astype("float32")
y = rng.integers(0, C, size=(B, 1)).astype("float32")
loss = margins.margin_loss("arcface", C, loss_weight=0.7)


def build():
    inputs = keras.Input((D,))
    embedding = keras.layers.UnitNormalization(name="embedding")(inputs)
    model = keras.Model(inputs, margins.MarginHead(C, plain_classifier=True)(embedding))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss)
    return model


def loss_and_gradients(model, x):  # [loss, d loss / d each weight, d loss / d x], and the compiled step's HLO
    step = jax.jit(jax.value_and_grad(lambda w, x: loss(y, model.stateless_call(w, [], x)[0]), argnums=(0, 1)))
    weights = [v.value for v in model.trainable_variables]
    value, (weight_gradients, input_gradient) = step(weights, x)
    return [value, *weight_gradients, input_gradient], step.lower(weights, x).compile().as_text()


def shards(variable):
    return [list(s.data.shape) for s in variable.value.addressable_shards]


def relative_difference(a, b):  # the largest over arrays, relative to each array's largest value
    return max(float(np.abs(np.asarray(u) - np.asarray(v)).max() / np.abs(np.asarray(u)).max()) for u, v in zip(a, b))


reference = build()
initial = reference.get_weights()
expected, _ = loss_and_gradients(reference, x)
reference.fit(x, y, batch_size=B, verbose=0)
distribution = margins.model_parallel(keras.distribution.list_devices())
with distribution.scope():
    sharded = build()
    sharded.set_weights(initial)
    found, hlo = loss_and_gradients(sharded, keras.distribution.distribute_tensor(x, distribution.get_data_layout(x.shape)))
    sharded.fit(x, y, batch_size=B, verbose=0)
    try:
        margins.MarginHead(C + 2).build((None, D))
    except margins.UserError as e:
        refused = str(e)
head = sharded.get_layer("logits")
print(json.dumps({
    "shards": [shards(head.kernel), shards(head.plain_kernel), shards(head.plain_bias)],
    "momentum_shards": [shards(v) for v in sharded.optimizer.variables if "logits" in v.path],
    "loss": [float(expected[0]), float(found[0])],
    "gradient_difference": relative_difference(expected, found),
    "gathered": [line.split(" = ")[1].split("{")[0] for line in hlo.splitlines() if " all-gather(" in line],
    "difference_after_a_step": relative_difference(reference.get_weights(), sharded.get_weights()),
    "refused": refused,
}))
"""


def test_class_sharded_head_over_four_cpu_devices_matches_the_whole_head():
    pytest.importorskip("jax")
    found = run_on_jax_devices(SHARDED_HEAD, 4)
    assert found["shards"] == [[[6, 2]] * 4, [[6, 2]] * 4, [[2]] * 4]  # 8 classes, 2 per device
    assert found["momentum_shards"] == found["shards"]  # the optimizer's state is split as its variables are
    assert found["loss"][1] == pytest.approx(found["loss"][0], rel=1e-6)
    assert found["gradient_difference"] < 1e-5 and found["difference_after_a_step"] < 1e-5
    assert found["gathered"] == ["f32[8,6]"]  # the batch's embeddings, never a kernel
    assert found["refused"] == "10 classes do not split evenly over 4 devices; the class-sharded head needs a multiple of 4"
