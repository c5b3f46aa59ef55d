"""--task=metric_learning end to end: a tiny run on open-set data (validation classes unseen in training)
retrieves above chance, exports L2-normalised embeddings equal to the Keras model's, names itself in the
metadata, and refuses the flags that cannot apply."""

import functools
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import assert_user_error, encode, tiny_flags, tiny_image, write_tfrecords

TRAIN_CLASSES, SEEN_AND_UNSEEN = 4, 6  # validation holds classes 4 and 5, never trained on


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric")
    train = write_tfrecords(root / "train", per_class=16, num_classes=TRAIN_CLASSES)
    val = write_tfrecords(root / "val", per_class=4, num_classes=SEEN_AND_UNSEEN, seed=1, shards=1)
    return train, val


def _flags(data, job_dir, **overrides):
    settings = dict(task="metric_learning", num_classes=TRAIN_CLASSES, embedding_size=16, metric_loss="cosface",
                    max_steps=40, eval_frequency=20, train_batch_size=16, initial_learning_rate=0.003,
                    random_flip="false")
    settings.update(overrides)
    return tiny_flags(*data, str(job_dir), **settings)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One tiny run, shared by the tests that look at what it wrote."""
    from tests.conftest import run_trainer

    job_dir = tmp_path_factory.mktemp("metric_job")
    result = run_trainer(_flags(data, job_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return str(job_dir), result


def _chance_recall_at_1(per_class, classes):
    """recall@1 of a random ranking: the nearest other image shares the query's class."""
    return (per_class - 1) / (per_class * classes - 1)


def test_a_tiny_run_retrieves_unseen_classes_above_chance(trained):
    job_dir, result = trained
    metrics = json.load(open(os.path.join(job_dir, "metrics.json")))
    best = metrics["best"]
    assert set(best) >= {"recall_at_1", "recall_at_5", "recall_at_10", "map_at_r"}
    assert best["recall_at_1"] == max(e["recall_at_1"] for e in metrics["evaluations"])  # the default tuned metric
    assert best["recall_at_1"] > 2 * _chance_recall_at_1(4, SEEN_AND_UNSEEN)
    assert result.stdout.strip().splitlines()[-1] == f"recall_at_1={best['recall_at_1']:.4f}"
    report = os.listdir(os.path.join(job_dir, "report"))
    assert {"report.html", "curves.png"} <= set(report)
    page = open(os.path.join(job_dir, "report", "report.html")).read()
    assert "Nearest neighbours" in page and all(name in page for name in report if name.endswith(".png"))


def _validation_images(data):
    """The validation set's images, encoded, with their labels (as the TFRecords hold them)."""
    records = tf.data.TFRecordDataset(sorted(glob.glob(data[1])))
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string), "image/class/label": tf.io.FixedLenFeature([], tf.int64)}
    parsed = [tf.io.parse_single_example(r, spec) for r in records]
    return [p["image/encoded"].numpy() for p in parsed], np.array([int(p["image/class/label"]) for p in parsed])


def test_the_export_serves_the_keras_models_normalised_embeddings(trained, data):
    from trainer import images, models
    from trainer.tasks import METRIC_LEARNING

    job_dir, _ = trained
    loaded = tf.saved_model.load(os.path.join(job_dir, "model"))
    meta = {k: v.numpy() for k, v in loaded.signatures["metadata"]().items()}
    assert meta["task"] == b"metric_learning" and int(meta["embedding_size"]) == 16 and meta["metric_loss"] == b"cosface"

    encoded, _ = _validation_images(data)
    served = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded[:6]))["embeddings"].numpy()
    assert served.shape == (6, 16)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-5)

    config = json.load(open(os.path.join(job_dir, "config.json")))
    best = json.load(open(os.path.join(job_dir, "metrics.json")))["best"]["step"]
    model = models.build_model("resnet-18", TRAIN_CLASSES, 16, head=functools.partial(
        METRIC_LEARNING.head, embedding_size=16, plain_classifier=config["loss_weight"] < 1))
    model.load_weights(os.path.join(job_dir, "checkpoints", f"best-{best}.weights.h5"))
    pixels = tf.stack([images.eval_image(tf.constant(b), 16) for b in encoded[:6]])
    expected = METRIC_LEARNING.evaluated_model(model)(pixels, training=False).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)

    by_pixels = loaded.signatures["serving_images"](images=pixels)["embeddings"].numpy()
    np.testing.assert_allclose(by_pixels, expected, atol=1e-5)


def test_classification_still_refuses_a_validation_label_outside_the_classes(data, tmp_path, trainer_main):
    result = trainer_main(tiny_flags(*data, str(tmp_path / "job"), num_classes=TRAIN_CLASSES))
    assert_user_error(result, "--validation_data_path: label 4", f"outside [0, {TRAIN_CLASSES})")


@pytest.mark.parametrize("overrides, message", [
    (dict(mixup_alpha=0.2), "--mixup_alpha does not apply to metric_learning"),
    (dict(label_smoothing=0.1), "--label_smoothing does not apply to metric_learning"),
    (dict(loss_weight=0), "--loss_weight must be in (0, 1]"),
    (dict(metric_loss="sphereface", loss_margin=1.5), "--loss_margin of sphereface multiplies the angle"),
    (dict(classifier_parallelism="model"), "--classifier_parallelism model needs the JAX backend (add --backend=jax)"),
    (dict(task="classification", metric_loss="arcface"), "--metric_loss applies to --task=metric_learning only"),
])
def test_flags_that_cannot_apply_are_refused_by_name(data, tmp_path, trainer_main, overrides, message):
    assert_user_error(trainer_main(_flags(data, tmp_path / "job", **overrides)), message)


def test_an_image_list_with_unseen_validation_ids_trains(tmp_path, trainer_main):
    """PAI's `path label_id` lines; validation ids far outside the training classes are data, not errors."""
    rng = np.random.default_rng(0)
    lines = {"train.txt": [], "val.txt": []}
    for name, classes, per_class, offset in (("train.txt", range(3), 6, 0), ("val.txt", range(2, 5), 3, 1000)):
        for label in classes:
            for i in range(per_class):
                path = tmp_path / f"{name[:-4]}_{label}_{i}.png"
                path.write_bytes(encode(tiny_image(label, rng), "PNG"))
                lines[name].append(f"{path.name} {label + (offset if label > 2 else 0)}\n")
    for name, rows in lines.items():
        (tmp_path / name).write_text("".join(rows))
    result = trainer_main(_flags((str(tmp_path / "train.txt"), str(tmp_path / "val.txt")), tmp_path / "job",
                                 num_classes=3, max_steps=2, eval_frequency=2, train_batch_size=6, eval_batch_size=4,
                                 max_batch_fraction=0))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(tmp_path / "job" / "metrics.json"))["best"]["queries"] == 9


def test_the_head_split_over_two_devices_trains_evaluates_and_exports(data, tmp_path):
    """--classifier_parallelism=model through the trainer on JAX with two host devices (the sharding's
    numbers against the unsplit head are tests/test_margins.py's)."""
    from tests.conftest import run_trainer

    job_dir = tmp_path / "job"
    result = run_trainer(_flags(data, job_dir, backend="jax", classifier_parallelism="model", max_steps=4,
                                eval_frequency=4, max_batch_fraction=0),
                         env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "head split by class over 2 devices" in result.stdout
    loaded = tf.saved_model.load(str(job_dir / "model"))
    encoded, _ = _validation_images(data)
    served = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded[:2]))["embeddings"].numpy()
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-5)


def test_a_class_count_that_does_not_split_evenly_is_refused(data, tmp_path):
    from tests.conftest import run_trainer

    result = run_trainer(_flags(data, tmp_path / "job", backend="jax", classifier_parallelism="model", num_classes=3),
                         env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "KERAS_BACKEND": "jax"})
    assert_user_error(result, "--num_classes=3 must be a multiple of the 2 devices")
