"""The training recipe's input side: augmentation, MixUp / CutMix, class balancing, the small-data batch guard.

Each test fails if its feature silently does nothing. Tiny images (16-32 px),
a few dozen of them; one short run through the trainer.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import encode, tiny_flags, tiny_image, write_folder
from trainer import augment, data, images, sources
from trainer.tasks import CLASSIFICATION, MULTI_LABEL

FMT = sources.RecordFormat()
COUNTS = (24, 6, 3)  # images per class of the imbalanced set


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """(source, scan) of an image list with COUNTS images of classes 0, 1, 2."""
    root = tmp_path_factory.mktemp("imbalanced")
    rng = np.random.default_rng(0)
    lines = []
    for label, count in enumerate(COUNTS):
        for i in range(count):
            (root / f"{label}_{i}.png").write_bytes(encode(tiny_image(label, rng), "PNG"))
            lines.append(f"{label}_{i}.png {label}\n")
    (root / "list.txt").write_text("".join(lines))
    source = sources.open_source(str(root / "list.txt"), "training_data_path")
    return source, data.scan(source, 3, FMT, 0.0)


def batches(source_and_scan, count, batch_size=8, start_step=0, **options):
    source, scan = source_and_scan
    ds = data.training_dataset(source, scan, FMT, CLASSIFICATION.target, batch_size, 16, 3, 7, 0.08, True, start_step,
                               **options)
    return [tuple(np.asarray(part) for part in batch) for batch in ds.take(count).as_numpy_iterator()]


def plain_batch(size=8, side=16):
    """Image i is one grey level, 20 + 25 i, and its own class (C = size); weights 1, 2, ..."""
    levels = 20 + 25 * np.arange(size)
    pixels = np.broadcast_to(levels[:, None, None, None], (size, side, side, 3)).astype(np.uint8)
    return tf.constant(pixels), tf.eye(size), tf.range(1, size + 1, dtype=tf.float32), levels


def partners(targets):
    """Per row: own share lam and the partner's class (own class when unmixed)."""
    own = np.diag(targets)
    other = np.where(np.arange(len(targets))[:, None] == np.arange(len(targets)), -1.0, targets).argmax(axis=1)
    return own, np.where(own > 1 - 1e-6, np.arange(len(targets)), other)


def test_mixup_mixes_targets_and_weights_as_the_pixels(seed=3):
    pixels, targets, weights, levels = plain_batch()
    mixed, mixed_targets, mixed_weights = augment.batch_mixer(0.4, 0.0, seed)(tf.constant(0, tf.int64),
                                                                             (pixels, targets, weights))
    lam, partner = partners(mixed_targets.numpy())
    np.testing.assert_allclose(mixed_targets.numpy().sum(axis=1), 1.0, atol=1e-6)  # a convex combination
    expected = lam * levels + (1 - lam) * levels[partner]
    np.testing.assert_allclose(mixed.numpy()[:, 5, 7, 0], expected, atol=0.51)  # uint8: rounded
    np.testing.assert_allclose(mixed_weights.numpy(), lam * (np.arange(8) + 1) + (1 - lam) * (partner + 1), rtol=1e-5)
    assert ((lam > 0.05) & (lam < 0.95)).sum() >= 2  # some images really are blends


def test_cutmix_weighs_targets_by_the_pasted_pixels(seed=3):
    pixels, targets, weights, levels = plain_batch(side=32)
    mixed, mixed_targets = augment.batch_mixer(0.0, 1.0, seed)(tf.constant(1, tf.int64), (pixels, targets))
    lam, partner = partners(mixed_targets.numpy())
    mixed = mixed.numpy()[..., 0]
    for i in range(8):
        assert set(np.unique(mixed[i])) <= {levels[i], levels[partner[i]]}  # pasted, not blended
        np.testing.assert_allclose((mixed[i] == levels[i]).mean(), lam[i], atol=1e-6)
    assert (lam < 0.99).sum() >= 4


def test_with_both_even_steps_mix_up_and_odd_steps_cut_mix():
    pixels, targets, _, levels = plain_batch()
    mix = augment.batch_mixer(1.0, 1.0, 5)
    blended = mix(tf.constant(4, tf.int64), (pixels, targets))[0].numpy()
    pasted = mix(tf.constant(7, tf.int64), (pixels, targets))[0].numpy()
    assert not np.isin(blended, levels).all() and np.isin(pasted, levels).all()


def test_mixing_reaches_the_training_batches(imbalanced):
    for options in ({"mixup_alpha": 1.0}, {"cutmix_alpha": 1.0}):
        targets = np.concatenate([t for _, t in batches(imbalanced, 4, **options)])
        assert ((targets > 0.01) & (targets < 0.99)).any(axis=1).mean() > 0.25, options  # some partners share a class


@pytest.mark.parametrize("options", [{"augmentation": "randaugment"}, {"augmentation": "augmix"},
                                     {"random_erasing": 0.9}])
def test_augmentations_change_the_images(imbalanced, options):
    basic = batches(imbalanced, 2)
    changed = batches(imbalanced, 2, **options)
    for (before, targets), (after, same_targets) in zip(basic, changed):
        np.testing.assert_array_equal(targets, same_targets)  # the same images, crops and flips ...
        differs = [not np.array_equal(b, a) for b, a in zip(before, after)]
        assert np.mean(differs) >= 0.5, options  # ... changed by the layer


def test_none_keeps_the_whole_image_unflipped(imbalanced):
    source, _ = imbalanced
    whole = [images.whole_image(tf.io.read_file(path), 16).numpy() for path in source.files]
    for image in batches(imbalanced, 2, augmentation="none")[0][0]:
        assert any(np.array_equal(image, w) for w in whole)


def test_the_multi_label_default_crop_keeps_every_region():
    pixels = np.zeros((16, 40, 3), np.uint8)  # 2.5:1, wider than any crop the aspect range allows
    pixels[:, :20, 0] = 255  # red left, green right
    pixels[:, 20:, 1] = 255
    encoded = tf.constant(encode(pixels, "PNG"))
    whole = images.whole_image(encoded, 16).numpy()
    for seed in range(6):
        out = images.train_image(encoded, 16, tf.constant([seed, 1], tf.int64), MULTI_LABEL.crop_min_area, True).numpy()
        assert np.array_equal(out, whole) or np.array_equal(out, whole[:, ::-1])


def test_the_sampler_draws_every_class_equally_often(imbalanced):
    def shares(**options):
        targets = np.concatenate([t for _, t in batches(imbalanced, 60, augmentation="none", **options)])
        return np.bincount(targets.argmax(axis=1), minlength=3) / len(targets)

    np.testing.assert_allclose(shares(class_balancing="sampler"), 1 / 3, atol=0.05)  # 480 draws
    assert shares()[0] > 0.6  # without it, class 0's 24 of 33


def test_loss_weights_are_inverse_class_frequency(imbalanced):
    expected = len(imbalanced[1].keys) / len(COUNTS) / np.array(COUNTS)  # 1 / count, scaled to mean 1 over images
    for _, targets, weights in batches(imbalanced, 6, class_balancing="weights", augmentation="none"):
        np.testing.assert_allclose(weights, expected[targets.argmax(axis=1)], rtol=1e-6)


def test_multi_label_balancing_by_mean_inverse_frequency_and_rarest_label():
    labels, splits = np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 3, 5, 6, 6])  # [0], [0, 1], [1, 1], [2], []
    # classes 0, 1: 2 images each (a label listed twice counts once), class 2: 1; no label counts as the commonest.
    np.testing.assert_allclose(augment.loss_weights(labels, splits, 3), np.array([1, 1, 1, 2, 1]) / 1.2, rtol=1e-6)
    np.testing.assert_allclose(augment.sampler_acceptance(labels, splits, 3), [0.5, 0.5, 0.5, 1.0, 0.5])


@pytest.mark.parametrize("options", [
    {"augmentation": "randaugment", "class_balancing": "sampler"},
    {"augmentation": "augmix", "class_balancing": "weights"},
])
def test_a_resumed_stream_is_the_uninterrupted_one(imbalanced, options):
    options.update(random_erasing=0.5, mixup_alpha=0.4, cutmix_alpha=1.0)
    uninterrupted = batches(imbalanced, 5, batch_size=4, **options)
    resumed = batches(imbalanced, 2, batch_size=4, start_step=3, **options)
    for before, after in zip(uninterrupted[3:], resumed):
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch_size, images_, fraction, replicas, expected", [
    (32, 100, 0.1, 1, 10), (32, 100, 0.1, 4, 8), (32, 100, 0.02, 4, 4), (32, 100, 0.29, 1, 29),
    (8, 100, 0.1, 1, 8), (32, 100, 0.0, 1, 32), (4, 10, 0.1, 4, 4),
])
def test_the_batch_guard_table(batch_size, images_, fraction, replicas, expected, capsys):
    assert data.fitted_batch_size(batch_size, images_, fraction, replicas) == expected
    said = capsys.readouterr().out
    assert (said == "") == (expected == batch_size)
    if said:
        assert said.startswith(f"--train_batch_size lowered from {batch_size} to {expected}: ")
        assert f"--max_batch_fraction={fraction:g} of the {images_} training images" in said


def test_a_run_with_the_whole_recipe_trains_on_a_lowered_batch(tmp_path, trainer_main):
    train = write_folder(tmp_path / "train", per_class=8)
    val = write_folder(tmp_path / "val", per_class=2, seed=1)
    args = tiny_flags(train, val, tmp_path / "job", max_batch_fraction=0.25, augmentation="randaugment",
                      random_erasing=0.5, mixup_alpha=0.4, cutmix_alpha=1.0, class_balancing="weights", max_steps=2)
    result = trainer_main(args)
    assert result.returncode == 0, result.stderr
    assert ("--train_batch_size lowered from 8 to 4: 8 is more than --max_batch_fraction=0.25 of the 16 training "
            "images") in result.stdout
    config = json.loads((tmp_path / "job" / "config.json").read_text())
    assert config["train_batch_size"] == 4
