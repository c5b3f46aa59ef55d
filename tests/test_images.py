"""Every supported encoding decodes to RGB; crops are the right size and reproducible."""

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import encode
from trainer import images


@pytest.fixture
def pixels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt, mode", [
    ("JPEG", None), ("PNG", None), ("GIF", None), ("BMP", None),
    ("PNG", "L"), ("JPEG", "L"), ("PNG", "RGBA"), ("JPEG", "CMYK"),
])
def test_formats_and_modes_decode_to_rgb(pixels, fmt, mode):
    encoded = tf.constant(encode(pixels, fmt, mode))
    decoded = images.decode_rgb(encoded)
    assert decoded.shape == (24, 32, 3) and decoded.dtype == tf.uint8
    assert list(images.image_shape(encoded).numpy()) == [24, 32]
    for out in (images.eval_image(encoded, 16), images.train_image(encoded, 16, tf.constant([1, 2], tf.int64), 0.08, True)):
        assert out.shape == (16, 16, 3) and out.dtype == tf.uint8


def test_lossless_colours_survive_decoding(pixels):
    decoded = images.decode_rgb(tf.constant(encode(pixels, "PNG"))).numpy()
    np.testing.assert_array_equal(decoded, pixels)
    cmyk = images.decode_rgb(tf.constant(encode(pixels, "JPEG", "CMYK"))).numpy().astype(int)
    assert np.abs(cmyk - pixels.astype(int)).mean() < 30  # JPEG is lossy, but colours stay put


def test_training_crop_is_reproducible_for_a_seed(pixels):
    encoded = tf.constant(encode(pixels, "PNG"))
    crop = lambda seed: images.train_image(encoded, 16, tf.constant(seed, tf.int64), 0.08, True).numpy()
    np.testing.assert_array_equal(crop([3, 4]), crop([3, 4]))
    assert any(not np.array_equal(crop([3, 4]), crop([3, s])) for s in range(5, 10))


def test_evaluation_keeps_the_centre(pixels):
    pixels[:] = 0
    pixels[8:16, 12:20] = 255  # a white square in the middle of a black 24x32 image
    out = images.eval_image(tf.constant(encode(pixels, "PNG")), 21).numpy()
    assert out[10, 10].min() == 255 and out[0, 0].max() == 0
