"""Multi-label: mosaics of 2-4 real digit tiles, labels = the digits that appear."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import assert_user_error, encode, tiny_flags, write_tfrecords
from trainer import data, metrics, sample_data, sources

NUM_CLASSES = 10


def mosaics(count, seed):
    """16x16 images of a 2x2 grid: 2-4 cells hold a digit tile, the rest stay blank."""
    train_x, train_y, _, _ = sample_data.digits_split()
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(count):
        canvas = np.zeros((16, 16), np.uint8)
        cells = rng.choice(4, size=rng.integers(2, 5), replace=False)
        present = set()
        for cell in cells:
            i = rng.integers(len(train_x))
            r, c = divmod(int(cell), 2)
            canvas[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = train_x[i]
            present.add(int(train_y[i]))
        images.append(encode(np.stack([canvas] * 3, axis=-1), "PNG"))
        labels.append(sorted(present))
    return images, labels


def write_multi_label_tfrecords(root, count, seed):
    images, labels = mosaics(count, seed)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "data-0.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for image, ids in zip(images, labels):
            feature = {
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=ids)),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return path, images, labels


def multi_hot(labels):
    target = np.zeros((len(labels), NUM_CLASSES), bool)
    for row, ids in enumerate(labels):
        target[row, ids] = True
    return target


def test_auto_thresholds_beat_a_fixed_half_on_held_out_macro_f1(tmp_path, hypertune_file, trainer_main):
    train, _, _ = write_multi_label_tfrecords(str(tmp_path / "train"), 600, seed=0)
    val, _, _ = write_multi_label_tfrecords(str(tmp_path / "val"), 200, seed=1)
    _, test_images, test_labels = write_multi_label_tfrecords(str(tmp_path / "test"), 200, seed=2)
    job = tmp_path / "job"
    flags = tiny_flags(train, val, str(job), num_classes=NUM_CLASSES, task="multi_label", multi_label_threshold="auto",
                       eval_each_category="true", image_size=32, max_steps=150, eval_frequency=75, train_batch_size=32,
                       eval_batch_size=50, initial_learning_rate=0.003, random_flip="false", random_crop_min_area=0.8)
    result = trainer_main(flags, hypertune_file)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.load(open(job / "metrics.json"))
    assert report["metric"] == "mAP" and report["task"] == "multi_label"
    best = report["best"]
    assert set(best["per_category"]) == {str(i) for i in range(NUM_CLASSES)}
    assert result.stdout.strip().splitlines()[-1] == f"mAP={best['mAP']:.4f}"
    assert all("mAP" in json.loads(line) for line in open(hypertune_file))

    served = tf.saved_model.load(str(job / "model")).signatures["serving_default"](image_bytes=tf.constant(test_images))
    probabilities, predictions = served["probabilities"].numpy(), served["predictions"].numpy()
    np.testing.assert_array_equal(predictions, probabilities >= np.array(best["thresholds"], np.float32))
    truth = multi_hot(test_labels)
    auto_f1 = metrics.multi_label(probabilities, truth, np.array(best["thresholds"]))["macro_f1"]
    fixed_f1 = metrics.multi_label(probabilities, truth, np.full(NUM_CLASSES, 0.5))["macro_f1"]
    assert auto_f1 > fixed_f1
    assert metrics.multi_label(probabilities, truth, np.array(best["thresholds"]))["mAP"] > 0.5  # it learnt the digits

    first = served["classes"].numpy()[0]
    chosen = list(first[first >= 0])
    assert sorted(chosen) == list(np.flatnonzero(predictions[0]))
    assert [int(n) for n in served["class_names"].numpy()[0][: len(chosen)].astype(str)] == chosen


def test_image_list_with_several_labels_per_line(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 1,4,7\na.png 2\na.png\n")
    source = sources.open_source(str(listing), "training_data_path", sources.RecordFormat(several_labels=True))
    assert source.labels == ((1, 4, 7), (2,), ())
    scan = data.scan(source, 8, sources.RecordFormat(several_labels=True), 0.0)
    assert len(scan.keys) == 3
    with pytest.raises(data.UserError, match=r"label 7 of .*line 1.* outside \[0, 5\)"):
        data.scan(source, 5, sources.RecordFormat(several_labels=True), 0.0)


def test_single_label_list_refuses_several_labels(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 1,4\n")
    with pytest.raises(data.UserError, match="line 1: expected 'image_path integer_label'"):
        sources.open_source(str(listing), "training_data_path", sources.RecordFormat())


@pytest.mark.parametrize("flag, fragment", [
    ("--multi_label_threshold=1.5", "--multi_label_threshold must be 'auto' or a probability"),
    ("--hyperparameter_metric_tag=top_1_accuracy", "--hyperparameter_metric_tag must be one of mAP"),
    ("--task=detection", "--task must be one of classification, multi_label"),
])
def test_bad_multi_label_flags(tmp_path, flag, fragment, trainer_main):
    args = ["--training_data_path=t", "--validation_data_path=v", "--num_classes=3", "--max_steps=5",
            "--job-dir=/tmp/unused", "--task=multi_label", flag]
    assert_user_error(trainer_main(args), fragment)


def test_several_labels_in_a_single_label_tfrecord_name_the_task_flag(tmp_path, trainer_main):
    path, _, _ = write_multi_label_tfrecords(str(tmp_path / "ml"), 4, seed=0)
    val = write_tfrecords(tmp_path / "val", per_class=2, shards=1)
    assert_user_error(trainer_main(tiny_flags(path, val, tmp_path / "job", num_classes=10)), "--task=multi_label")
