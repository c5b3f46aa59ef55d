"""The training recipe's input side: augmentation past the crop, batch mixing, class balancing.

Per image, after images.py's crop and flip (--augmentation=basic): Keras 3's
RandAugment or AugMix, then RandomErasing. Per batch: MixUp or CutMix (both
on: even steps MixUp, odd steps CutMix, as timm alternates), the targets, and
the sample weights with them, mixed in the same proportion as the pixels.
Class balancing: each image's loss weight (inverse class frequency), or the
probability that the sampler keeps it.

Every random draw comes from a stateless seed derived from (--seed, position
in the stream): image index for per-image layers, step (and worker, when
several share a batch) for batch mixing, the index in the unfiltered stream
for the sampler. The layers' own SeedGenerators (variables that advance with
each call) are never used, so the stream is a pure function of (seed, step): a resumed run sees the batches an uninterrupted
one saw. Images stay uint8: each layer's float output is rounded back, so the
model's uint8 input, evaluation and the export are unchanged.
"""

import contextlib
import random

import keras
import numpy as np
import tensorflow as tf

from trainer import images

# Tags that keep the seed streams of the different draws apart (any distinct numbers).
_RANDAUGMENT, _AUGMIX, _ERASING, _MIX, _SAMPLER = range(1, 6)
# Keras 3.15's AugMix picks each chain's operations with Python's random while it is traced, i.e. once per
# pipeline (as RandAugment did, keras-team/keras#21169): so several variants are traced, each from its own
# Python seed, and each image goes through one of them, drawn from its seed.
AUGMIX_VARIANTS = 8


class _Seeds(keras.random.SeedGenerator):
    """A stateless stand-in for a layer's SeedGenerator: draw n gets fold_in(base, n), no variable."""

    def __init__(self, base):  # base: a [2] integer seed tensor; no super().__init__, which makes a variable
        self.base, self.draws = base, 0

    def next(self, ordered=True):
        self.draws += 1  # counts draws while the pipeline is traced: the same order, the same seeds, every trace
        return tf.random.experimental.stateless_fold_in(self.base, self.draws)


def stream_seed(seed, position, tag):
    """A [2] seed for one draw: of the run's seed, a position in the stream (image, step) and a tag."""
    pair = tf.stack([tf.cast(seed, tf.int64), tf.cast(position, tf.int64)])
    return tf.random.experimental.stateless_fold_in(pair, tag)


@contextlib.contextmanager
def _seeded(layer, seed):
    """Inside: `layer` (a Keras image preprocessing layer) draws from seeds derived from `seed`, on TensorFlow
    ops whatever the Keras backend (RandAugment and AugMix pass the same seeds to their sub-layers)."""
    seeds = _Seeds(seed)
    object.__setattr__(layer, "_get_seed_generator", lambda backend=None: seeds)
    layer.backend.set_backend("tensorflow")
    try:
        yield
    finally:
        object.__delattr__(layer, "_get_seed_generator")
        layer.backend.reset()


def _to_uint8(pixels):
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8)


def image_pipeline(augmentation, image_size, min_area, flip, randaugment_magnitude, random_erasing, seed):
    """(encoded image, index in the stream) -> uint8 [image_size, image_size, 3] training image.

    augmentation: basic (random resized crop with area in [min_area, 1], flip),
    randaugment / augmix (those, then Keras's layer), none (the whole image,
    resized: no crop, no flip). random_erasing: probability per image.
    """
    layers = []
    if augmentation == "randaugment":  # two operations per image, Keras's and the paper's default
        layers.append((_RANDAUGMENT, keras.layers.RandAugment(factor=randaugment_magnitude, seed=seed,
                                                              dtype="float32")))
    if augmentation == "augmix":
        layers.append((_AUGMIX, _AugMixVariants(seed)))
    if random_erasing:  # factor=(p, p): a single number would draw the probability from [0, p]
        layers.append((_ERASING, keras.layers.RandomErasing(factor=(random_erasing, random_erasing), seed=seed,
                                                            dtype="float32")))

    def prepare(encoded, index):
        if augmentation == "none":
            image = images.whole_image(encoded, image_size)
        else:
            image = images.train_image(encoded, image_size, tf.stack([tf.cast(seed, tf.int64), index]), min_area, flip)
        for tag, layer in layers:
            image = _apply(layer, image, stream_seed(seed, index, tag))
        return image

    return prepare


def _apply(layer, image, seed):
    """One image through a Keras layer, as a batch of one (its draws are then per image)."""
    if isinstance(layer, _AugMixVariants):
        return layer(image, seed)
    with _seeded(layer, seed):
        return _to_uint8(layer(image[None], training=True)[0])


class _AugMixVariants:
    """Keras's AugMix, its chains' operations drawn per image from AUGMIX_VARIANTS traced choices."""

    def __init__(self, seed):
        self.layer, self.seed = keras.layers.AugMix(seed=seed, dtype="float32"), seed

    def __call__(self, image, seed):
        def variant(number):
            def run():
                state = random.getstate()
                random.seed(f"{self.seed}/{number}")  # AugMix draws its operations from Python's random when traced
                try:
                    return _apply(self.layer, image, seed)
                finally:
                    random.setstate(state)

            return run

        # fold_in(seed, 0): a draw of its own (the layer's draws are fold_in(seed, n >= 1), see _Seeds)
        choice = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 0), 0,
                                             AUGMIX_VARIANTS, dtype=tf.int32)
        return tf.switch_case(choice, [variant(n) for n in range(AUGMIX_VARIANTS)])


def batch_mixer(mixup_alpha, cutmix_alpha, seed, worker=0):
    """(step, (images, targets[, weights])) -> the batch mixed; None when both alphas are 0.

    images uint8 [B, S, S, 3], targets float [B, C], weights [B]. Each image is
    mixed with another of the batch: MixUp blends the pixels with weight
    lam ~ Beta(mixup_alpha, mixup_alpha), CutMix pastes a box of area 1 - lam
    with lam ~ Beta(cutmix_alpha, ...); targets and weights become lam * own +
    (1 - lam) * partner's, lam counted in pixels for CutMix. worker: whose share
    of the global batch this is (data.training_dataset); each draws its own.
    """
    mixers = []
    if mixup_alpha:
        mixers.append(keras.layers.MixUp(alpha=mixup_alpha, seed=seed, dtype="float32"))
    if cutmix_alpha:
        cutmix = keras.layers.CutMix(seed=seed, dtype="float32")
        cutmix.factor = (cutmix_alpha, cutmix_alpha)  # Keras draws alpha from U(factor), bounded to [0, 1]; fixed here
        mixers.append(cutmix)
    if not mixers:
        return None

    def mix(step, batch):
        layer_seed = stream_seed(seed, step, _MIX)
        if worker:  # worker 0 draws as one process does: a one-process run's mixes are unchanged
            layer_seed = tf.random.experimental.stateless_fold_in(layer_seed, worker)
        if len(mixers) == 1:
            return _mix(mixers[0], batch, layer_seed)
        return tf.cond(step % 2 == 0, lambda: _mix(mixers[0], batch, layer_seed),
                       lambda: _mix(mixers[1], batch, layer_seed))

    return mix


def _mix(layer, batch, seed):
    images, targets, *weights = batch
    columns = tf.concat([targets, *[w[:, None] for w in weights]], axis=1)  # weights mix as the targets do
    with _seeded(layer, seed):
        transformation = layer.get_random_transformation(images, training=True)
        if "batch_masks" in transformation:  # CutMix: lam = the pixels kept (Keras's box area is off at small sizes)
            pasted = tf.reduce_mean(tf.cast(transformation["batch_masks"], tf.float32), axis=[1, 2, 3])
            transformation["mix_weight"] = 1.0 - pasted
        images = _to_uint8(layer.transform_images(images, transformation, training=True))
        columns = layer.transform_labels(tf.cast(columns, tf.float32), transformation, training=True)
    targets = columns[:, : targets.shape[-1]]
    return (images, targets, columns[:, -1]) if weights else (images, targets)


# Class balancing. A record's labels are labels[splits[i]:splits[i + 1]] (one id, or several for multi_label).

def _image_class_pairs(labels, splits, num_classes):
    """(image, class) for every distinct class of every image; an image without labels gets class -1."""
    lengths = np.diff(splits)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    pairs = np.unique(rows * num_classes + labels)  # a class listed twice for one image counts once
    rows, classes = pairs // num_classes, pairs % num_classes
    empty = np.flatnonzero(lengths == 0)
    return np.concatenate([rows, empty]), np.concatenate([classes, np.full(len(empty), -1)])


def _class_frequencies(labels, splits, num_classes):
    """Per (image, class) pair: its image, and the number of images of its class; an image without labels
    counts as one of the commonest class."""
    rows, classes = _image_class_pairs(labels, splits, num_classes)
    counts = np.bincount(classes[classes >= 0], minlength=num_classes)
    return rows, np.where(classes >= 0, counts[classes], max(counts.max(), 1))


def loss_weights(labels, splits, num_classes):
    """Per image (float32): the mean over its labels of 1 / images of that class, scaled to mean 1."""
    rows, frequency = _class_frequencies(labels, splits, num_classes)
    weights = np.bincount(rows, 1.0 / frequency) / np.bincount(rows)
    return (weights / weights.mean()).astype(np.float32)


def sampler_acceptance(labels, splits, num_classes):
    """Per image (float32): the probability the sampler keeps it, (images of the rarest class) / (images of its
    own rarest class). Single-label: every class then comes equally often in expectation."""
    rows, frequency = _class_frequencies(labels, splits, num_classes)
    rarest = np.full(len(splits) - 1, np.inf)
    np.minimum.at(rarest, rows, frequency)
    return (frequency.min() / rarest).astype(np.float32)


def key_table(keys, values):
    """A lookup from record key (int64) to a per-record float32 value."""
    initializer = tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.int64), tf.constant(values, tf.float32))
    return tf.lookup.StaticHashTable(initializer, 0.0)


def sampler_filter(keys, acceptance, seed):
    """Predicate for (index in the unfiltered stream, (key, ...)): keep the record with its probability,
    drawn from (seed, index), so each pass keeps a different subset and the same one on every run."""
    table = key_table(keys, acceptance)

    def keep(index, element):
        draw = tf.random.stateless_uniform([], stream_seed(seed, index, _SAMPLER))
        return draw < table.lookup(element[0])

    return keep
