"""Image decoding and the crops: random for training, central for evaluation, none (the whole image).

Every function takes encoded bytes (JPEG, PNG, GIF, BMP; grayscale, RGBA or
CMYK) and returns a uint8 RGB [size, size, 3] tensor. The serving signature of
the export uses eval_image, so a served image sees exactly what evaluation saw.
"""

import tensorflow as tf

EVAL_CROP_FRACTION = 0.875  # share of the shorter side the central eval crop keeps


def is_jpeg(encoded):
    return tf.equal(tf.strings.substr(encoded, 0, 3), b"\xff\xd8\xff")


def decode_rgb(encoded):
    """Any supported format to uint8 [h, w, 3]; the first frame of a GIF."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def image_shape(encoded):
    """[height, width] from the header for JPEG; otherwise by decoding."""
    return tf.cond(
        is_jpeg(encoded),
        lambda: tf.image.extract_jpeg_shape(encoded)[:2],
        lambda: tf.shape(decode_rgb(encoded))[:2],
    )


def _header_number(padded, offset, size, little_endian):
    """The unsigned integer of `size` bytes at `offset` of the header (padded so that any offset exists)."""
    digits = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, offset, size), tf.uint8), tf.int64)
    weights = tf.constant([256 ** i for i in range(size)] if little_endian else [256 ** i for i in reversed(range(size))],
                          tf.int64)
    return tf.reduce_sum(digits * weights)


def header_pixels(encoded):
    """width * height as the file's header states it, read before any decoding (int64): JPEG, PNG, GIF, BMP;
    0 for anything else (the decoder then decides). A few hundred bytes can declare a 23000x23000 image:
    this is how a decompression bomb is refused without being decoded."""
    padded = tf.strings.join([tf.strings.substr(encoded, 0, 32), tf.constant(b"\0" * 32)])
    start = tf.strings.substr(padded, 0, 8)

    def bmp():
        height = _header_number(padded, 22, 4, True)
        height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)  # negative: a top-down bitmap
        return _header_number(padded, 18, 4, True) * height

    return tf.case([
        (is_jpeg(encoded), lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64))),
        (tf.equal(start, b"\x89PNG\r\n\x1a\n"),
         lambda: _header_number(padded, 16, 4, False) * _header_number(padded, 20, 4, False)),
        (tf.equal(tf.strings.substr(start, 0, 4), b"GIF8"),
         lambda: _header_number(padded, 6, 2, True) * _header_number(padded, 8, 2, True)),
        (tf.equal(tf.strings.substr(start, 0, 2), b"BM"), bmp),
    ], default=lambda: tf.constant(0, tf.int64))


def decode_window(encoded, offset_height, offset_width, height, width):
    """Decodes only the window for JPEG (fused decode and crop), crops otherwise."""
    window = tf.stack([offset_height, offset_width, height, width])

    def jpeg():
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        return tf.image.crop_to_bounding_box(decode_rgb(encoded), offset_height, offset_width, height, width)

    image = tf.cond(is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def _resize(image, size):
    resized = tf.image.resize(image, [size, size], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def eval_image(encoded, size):
    """Central square crop of EVAL_CROP_FRACTION of the shorter side, resized."""
    shape = image_shape(encoded)
    side = tf.maximum(tf.cast(tf.cast(tf.reduce_min(shape), tf.float32) * EVAL_CROP_FRACTION, tf.int32), 1)
    offset_h = (shape[0] - side) // 2
    offset_w = (shape[1] - side) // 2
    return _resize(decode_window(encoded, offset_h, offset_w, side, side), size)


def whole_image(encoded, size):
    """The whole image resized to [size, size] (aspect ratio not kept): --augmentation=none."""
    return _resize(decode_rgb(encoded), size)


def train_image(encoded, size, seed, min_area, flip):
    """Random resized crop (area in [min_area, 1], aspect in [3/4, 4/3]) and flip.

    seed is a [2] int tensor: the same seed gives the same crop and flip, which
    is what makes a resumed run see the same images as an uninterrupted one.
    min_area >= 1 keeps the whole image, whatever its aspect ratio (no crop
    could, within [3/4, 4/3]).
    """
    if min_area >= 1:
        image = whole_image(encoded, size)
    else:
        image = _resize(_random_crop(encoded, seed, min_area), size)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    return image


def _random_crop(encoded, seed, min_area):
    shape = image_shape(encoded)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], axis=0),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(min_area, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return decode_window(encoded, begin[0], begin[1], crop_size[0], crop_size[1])
