"""The backbone table's contract (pooled features of the listed width, offline, at the smallest size each takes),
the transformer families (ViT, Swin) in mixed precision and under weight decay, the image sizes and names the
trainer refuses, and AdamW's decoupled weight decay with the moving average and head-first freezing."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import assert_user_error
from trainer import config as config_lib, models
from trainer.backbones import BACKBONES

# The largest, as in test_models.py (the transformers, even swin-base at 224 pixels, take under 15 s).
SLOW = {"resnet-101", "resnet-152", "resnet-200", "efficientnet-b4", "efficientnet-b5", "efficientnet-b6",
        "efficientnet-b7"}
FLAGS = ["--training_data_path=t", "--validation_data_path=v", "--num_classes=3", "--job-dir=/tmp/unused",
         "--max_steps=5"]


def smallest_size(model_type):
    entry = BACKBONES[model_type]
    return -(-entry.min_image_size // entry.size_multiple) * entry.size_multiple


def images(size, count=2, seed=0):
    return np.random.default_rng(seed).integers(0, 255, size=(count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("model_type", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m
                                        for m in BACKBONES])
def test_backbone_gives_pooled_features_of_the_table_width_at_its_smallest_size(model_type):
    size = smallest_size(model_type)
    backbone = models.backbone_builder(model_type)((size, size, 3))
    features = backbone(images(size).astype("float32"))
    assert backbone.name == "backbone"
    assert features.shape == (2, BACKBONES[model_type].features)
    assert np.isfinite(features.numpy()).all()


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("model_type", ["vit-tiny", "swin-tiny"])
def test_transformer_runs_in_mixed_bfloat16_with_float32_logits(model_type, mixed_bfloat16):
    size = smallest_size(model_type)
    model = models.build_model(model_type, num_classes=3, image_size=size, seed=0)
    logits = model(images(size), training=True)
    assert model.get_layer("backbone").output.dtype == "bfloat16"
    assert logits.shape == (2, 3) and logits.dtype == tf.float32
    assert np.isfinite(logits.numpy()).all()


# What weight decay covers in each family (by the variable's path ending) and what it leaves alone.
DECAYED = {
    "vit-tiny": ("patch_embedding/kernel", "mha/query/kernel", "mha/key/kernel", "mha/value/kernel",
                 "mha/attention_output/kernel", "mlp/dense_1/kernel", "mlp/dense_2/kernel", "logits/kernel"),
    "swin-tiny": ("conv_projection/kernel", "attn/attention_qkv/kernel", "attn/attention_projection/kernel",
                  "mlp/fc1/kernel", "mlp/fc2/kernel", "downsample/reduction/kernel", "logits/kernel"),
}
NOT_DECAYED = {"bias", "gamma", "beta", "embeddings", "class_token", "relative_position_bias_table"}


@pytest.mark.parametrize("model_type", ["vit-tiny", "swin-tiny"])
def test_weight_decay_covers_every_attention_and_mlp_kernel_and_nothing_else(model_type):
    model = models.build_model(model_type, num_classes=3, image_size=smallest_size(model_type), weight_decay=1e-4)
    decayed = [v for v in model.trainable_variables if v.regularizer is not None]
    for ending in DECAYED[model_type]:
        assert any(v.path.endswith(ending) for v in decayed), ending
    assert {v.name for v in decayed} == {"kernel"} and len(model.losses) == len(decayed)
    left = models.not_decayed(model)  # what adamw leaves alone
    assert {v.name for v in left} <= NOT_DECAYED
    assert len(left) + len(decayed) == len(model.trainable_variables)


@pytest.mark.parametrize("args, line", [
    (["--model_type=vit-tiny", "--image_size=100"],
     "--image_size must be a multiple of 16 for vit-tiny (got 100; nearest: 96 or 112)"),
    (["--model_type=vit-base", "--image_size=8"], "--image_size must be between 16 and 1024 pixels (got 8)"),
    (["--model_type=swin-tiny", "--image_size=256"],
     "--image_size must be a multiple of 224 for swin-tiny (got 256; nearest: 224 or 448)"),
    (["--model_type=swin-base", "--image_size=32"],
     "--image_size must be a multiple of 224 for swin-base (got 32; nearest: 224)"),
    (["--model_type=swin-small", "--image_size=1000"],
     "--image_size must be a multiple of 224 for swin-small (got 1000; nearest: 896)"),
    (["--model_type=xcit_small_12_p16"],
     "--model_type=xcit_small_12_p16: XCiT has no maintained Keras implementation, so this trainer does not build "
     "it; choose one of resnet-18|34|50|101|152|200, efficientnet-b0..b7, vit-tiny|small|base, swin-tiny|small|base"),
    (["--model_type=resnet-19"], "--model_type must be one of resnet-18|34|50|101|152|200, efficientnet-b0..b7, "
                                 "vit-tiny|small|base, swin-tiny|small|base (got 'resnet-19')"),
])
def test_impossible_image_size_or_model_type_is_one_line_naming_what_works(args, line, trainer_main):
    assert assert_user_error(trainer_main(FLAGS + args)) == f"error: {line}"


@pytest.mark.parametrize("model_type, size", [("vit-tiny", 16), ("vit-base", 1024), ("swin-tiny", 224),
                                              ("swin-base", 448), ("swin-small", 896)])
def test_valid_transformer_image_sizes_are_accepted(model_type, size):
    values = dict(training_data_path="t", validation_data_path="v", num_classes=3, max_steps=5,
                  model_type=model_type, image_size=size)
    assert config_lib.from_values(values).image_size == size


def tiny_model():
    """Features from a dense layer and a layer norm (the "backbone"), then a dense head: kernels, biases, a norm."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    backbone = keras.Sequential([keras.layers.Dense(8), keras.layers.LayerNormalization()], name="backbone")
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(backbone(inputs)))


def tiny_data():
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_adamw_decay_shrinks_kernels_by_learning_rate_times_decay_and_leaves_biases_and_norms():
    model = tiny_model()
    optimizer = models.make_optimizer("adamw", 0.1, weight_decay=0.5, not_decayed=models.not_decayed(model))
    before = {v.path: v.numpy() for v in model.trainable_variables}
    # Zero gradients: Adam moves nothing, so only the decay acts.
    optimizer.apply([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables)
    for v in model.trainable_variables:
        expected = before[v.path] * (1 - 0.1 * 0.5) if v.name == "kernel" else before[v.path]
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, err_msg=v.path)


def test_adamw_trains_a_tiny_model():
    model = tiny_model()
    optimizer = models.make_optimizer("adamw", 0.05, weight_decay=0.05, not_decayed=models.not_decayed(model))
    models.compile_model(model, optimizer, LOSS)
    history = model.fit(*tiny_data(), batch_size=8, epochs=10, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0]


def test_adamw_with_moving_average_and_head_first_freezing():
    model = tiny_model()
    backbone = model.get_layer("backbone")
    optimizer = models.make_optimizer("adamw", 0.01, ema_decay=0.9, frozen=backbone.trainable_variables,
                                      frozen_steps=2, weight_decay=0.5, not_decayed=models.not_decayed(model))
    assert isinstance(optimizer, keras.optimizers.AdamW)
    models.compile_model(model, optimizer, LOSS)
    x, y = tiny_data()
    frozen = [v.numpy() for v in backbone.trainable_variables]
    head = model.get_layer("logits").kernel
    start = head.numpy()
    for _ in range(2):
        model.train_on_batch(x, y)
    # Frozen: neither the gradients nor the decay moved the backbone; the head trained.
    for value, v in zip(frozen, backbone.trainable_variables):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)
    assert not np.array_equal(head.numpy(), start)
    raw = head.numpy()
    with models.averaged_weights(model):
        averaged = head.numpy()
    assert not np.allclose(averaged, raw) and np.array_equal(head.numpy(), raw)
    model.train_on_batch(x, y)  # step 2: thawed
    assert all(not np.array_equal(v.numpy(), value) for value, v in zip(frozen, backbone.trainable_variables))
