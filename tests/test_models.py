"""Contract tests over every backbone of the table, at tiny size, plus weight decay and pretrained loading."""

import numpy as np
import pytest
import tensorflow as tf

from trainer import models
from trainer.backbones import BACKBONES
from trainer.cli import UserError
from tests.conftest import run_on_jax_devices

LARGE = {"resnet-101", "resnet-152", "resnet-200", "efficientnet-b4", "efficientnet-b5", "efficientnet-b6", "efficientnet-b7",
         "swin-small", "swin-base"}


@pytest.mark.parametrize("model_type", [
    pytest.param(m, marks=pytest.mark.slow) if m in LARGE else m for m in BACKBONES
])
def test_backbone_trains_one_step_with_a_gradient_for_every_parameter(model_type):
    entry = BACKBONES[model_type]
    size = max(32, -(-entry.min_image_size // entry.size_multiple) * entry.size_multiple)  # Swins: 224
    model = models.build_model(model_type, num_classes=3, image_size=size, weight_decay=1e-4, seed=0)
    images = np.random.default_rng(0).integers(0, 255, size=(2, size, size, 3), dtype=np.uint8)
    labels = tf.one_hot([0, 2], 3)
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels, logits)) + tf.add_n(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    assert logits.shape == (2, 3) and logits.dtype == tf.float32
    assert np.isfinite(loss.numpy())
    missing = [v.path for v, g in zip(model.trainable_variables, grads) if g is None]
    assert not missing
    assert all(np.isfinite(tf.convert_to_tensor(g).numpy()).all() for g in grads)  # embeddings' are sparse


def test_weight_decay_is_half_the_squared_kernel_norm_times_the_flag():
    model = models.build_model("resnet-18", num_classes=4, image_size=32, weight_decay=0.01, seed=0)
    kernels = [v for v in model.trainable_variables if v.name in ("kernel", "depthwise_kernel")]
    expected = 0.01 * sum(float(np.sum(np.square(v.numpy()))) for v in kernels) / 2
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-4)
    assert len(model.losses) == len(kernels)  # no batch-norm scale or bias is decayed


def test_no_weight_decay_adds_no_loss():
    assert models.build_model("resnet-18", num_classes=4, image_size=32).losses == []


def test_pretrained_weights_load_backbone_and_skip_a_head_of_another_size(tmp_path):
    source = models.build_model("resnet-18", num_classes=3, image_size=32, seed=1)
    path = str(tmp_path / "source.weights.h5")
    source.save_weights(path)
    target = models.build_model("resnet-18", num_classes=5, image_size=32, seed=2)
    assert models.load_pretrained(target, path, "resnet-18", 32) == 3
    for a, b in zip(source.get_layer("backbone").weights, target.get_layer("backbone").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    same_head = models.build_model("resnet-18", num_classes=3, image_size=32, seed=3)
    models.load_pretrained(same_head, path, "resnet-18", 32)
    np.testing.assert_array_equal(same_head.get_layer("logits").kernel.numpy(), source.get_layer("logits").kernel.numpy())


def test_pretrained_weights_of_another_architecture_are_refused(tmp_path):
    path = str(tmp_path / "b0.weights.h5")
    models.build_model("efficientnet-b0", num_classes=3, image_size=32).save_weights(path)
    with pytest.raises(UserError, match="does not hold resnet-18 weights"):
        models.load_pretrained(models.build_model("resnet-18", 3, 32), path, "resnet-18", 32)
    with pytest.raises(UserError, match="does not exist"):
        models.load_pretrained(models.build_model("resnet-18", 3, 32), str(tmp_path / "missing.weights.h5"), "resnet-18", 32)


def test_one_pass_batch_norm_statistics_match_keras_two_pass():
    images = np.random.default_rng(1).integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8)
    outputs = []
    for one_pass in (False, True):
        model = models.build_model("resnet-18", num_classes=3, image_size=32, seed=5, one_pass_moments=one_pass)
        outputs.append(model(images, training=True).numpy())
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


INDEXED_MAX_POOL = """
import functools, json
import jax, jax.numpy as jnp, keras, numpy as np
from trainer import models

rng = np.random.default_rng(0)
pools = []
for pool, strides, padding, shape in [((3, 3), (2, 2), "valid", (2, 13, 13, 3)), ((3, 3), (2, 2), "same", (2, 12, 11, 2)),
                                      ((2, 2), None, "valid", (1, 8, 9, 2)), ((3, 2), (1, 2), "same", (2, 7, 8, 1)),
                                      ((2, 2), (3, 3), "valid", (1, 10, 11, 2))]:  # positions no window reaches
    layer = keras.layers.MaxPooling2D(pool, strides=strides, padding=padding)
    x = jnp.asarray(rng.integers(0, 3, shape).astype("float32"))  # values 0-2: most windows hold equal maxima
    keras_pool, indexed = (lambda t: layer.call(t)), functools.partial(models._indexed_max_pool, layer)
    dy = rng.integers(-4, 5, keras_pool(x).shape).astype("float32")
    (y0, back0), (y1, back1) = jax.vjp(keras_pool, x), jax.vjp(indexed, x)
    pools.append([bool(np.array_equal(y0, y1)), bool(np.array_equal(back0(dy)[0], back1(dy)[0]))])

# the whole ResNet: build_model uses the indexed pool on JAX, and one step's gradients do not move
images = rng.integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8)
grads = []
for indexed in (False, True):
    model = models.build_model("resnet-18", num_classes=3, image_size=32, seed=5, indexed_max_pool=indexed)
    def loss(values):
        logits, _ = model.stateless_call(values, model.non_trainable_variables, images, training=True)
        return jnp.sum(logits ** 2)
    grads.append(jax.grad(loss)([v.value for v in model.trainable_variables]))
gap = max(float(jnp.max(jnp.abs(a - b)) / (float(jnp.max(jnp.abs(a))) + 1e-12)) for a, b in zip(*grads))
print(json.dumps({"pools": pools, "resnet_relative_gap": gap}))
"""


def test_max_pool_gradient_through_indices_is_keras_own_even_on_ties():
    # The JAX step differentiates max pooling through each window's argmax (faster on GPU and CPU);
    # outputs and gradients must be exactly what Keras' pool gives, including which of equal maxima wins.
    result = run_on_jax_devices(INDEXED_MAX_POOL, devices=1)
    assert result["pools"] == [[True, True]] * 5
    assert result["resnet_relative_gap"] < 1e-5


SPACE_TO_DEPTH = """
import json
import jax, jax.numpy as jnp, numpy as np
from trainer import models

images = np.random.default_rng(0).integers(0, 255, size=(4, 64, 64, 3), dtype=np.uint8)
results = []
for stem in (False, True):
    model = models.build_model("resnet-18", num_classes=3, image_size=64, seed=5, space_to_depth_stem=stem)
    def loss(values):
        logits, _ = model.stateless_call(values, model.non_trainable_variables, images, training=True)
        return jnp.sum(logits ** 2), logits
    results.append(jax.grad(loss, has_aux=True)([v.value for v in model.trainable_variables]))
rearranged = [layer.name for layer in models._all_layers(model)
              if getattr(vars(layer).get("call"), "func", None) is models._space_to_depth_conv]
(grads0, logits0), (grads1, logits1) = results
gap = max(float(jnp.max(jnp.abs(a - b)) / (float(jnp.max(jnp.abs(a))) + 1e-12)) for a, b in zip(grads0, grads1))
# EfficientNet's stem: a 3x3 kernel, padded to whole 2x2 blocks
b0 = [models.build_model("efficientnet-b0", num_classes=3, image_size=64, seed=5, space_to_depth_stem=stem)
      for stem in (False, True)]
b0_rearranged = [layer.name for layer in models._all_layers(b0[1])
                 if getattr(vars(layer).get("call"), "func", None) is models._space_to_depth_conv]
b0_gap = float(jnp.max(jnp.abs(b0[0](images, training=True) - b0[1](images, training=True))))
print(json.dumps({"rearranged": rearranged, "logits_gap": float(jnp.max(jnp.abs(logits0 - logits1))), "grad_gap": gap,
                  "b0_rearranged": b0_rearranged, "b0_logits_gap": b0_gap}))
"""


def test_space_to_depth_stem_computes_the_same_step():
    result = run_on_jax_devices(SPACE_TO_DEPTH, devices=1)
    assert result["rearranged"] == ["conv1_conv"]  # the stem, and only it
    assert result["logits_gap"] < 1e-4 and result["grad_gap"] < 1e-4
    assert result["b0_rearranged"] == ["stem_conv"] and result["b0_logits_gap"] < 1e-4
