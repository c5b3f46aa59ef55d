"""Data sources without training: which records an evaluation sees, names, list quirks."""

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import encode, tiny_image, write_folder, write_tfrecords
from trainer import data, sources
from trainer.tasks import CLASSIFICATION


def test_a_partial_evaluation_draws_from_every_class(tmp_path):
    folder = write_folder(tmp_path / "val", per_class=6, num_classes=3)  # sorted by class on disk
    source = sources.open_source(folder, "validation_data_path")
    scan = data.scan(source, 3, sources.RecordFormat(), 0.0)
    ds, count = data.eval_dataset(source, scan, sources.RecordFormat(), CLASSIFICATION.target, 6, 16, 3, num_images=6)
    labels = np.concatenate([y.argmax(axis=1) for _, y in ds.as_numpy_iterator()])
    assert count == 6 and len(labels) == 6
    assert len(set(labels)) > 1  # the first 6 records would all be class 0
    again_ds, _ = data.eval_dataset(source, scan, sources.RecordFormat(), CLASSIFICATION.target, 6, 16, 3, 6)
    again = np.concatenate([y.argmax(axis=1) for _, y in again_ds.as_numpy_iterator()])
    np.testing.assert_array_equal(labels, again)  # the same subset every evaluation


def test_label_map_must_follow_the_class_folders(tmp_path):
    folder = write_folder(tmp_path / "train", per_class=1, num_classes=2)
    source = sources.open_source(folder, "training_data_path")
    label_map = tmp_path / "labels.txt"
    label_map.write_text("class_1\nclass_0\n")
    with pytest.raises(data.UserError, match="--label_map_path: .* class_0, class_1"):
        sources.class_names(source, source, 2, str(label_map))
    label_map.write_text("class_0\nclass_1\n")
    assert sources.class_names(source, source, 2, str(label_map)) == ("class_0", "class_1")


def test_list_written_with_a_byte_order_mark(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffa.png 0\r\na.png 1\r\n".encode("utf-8"))
    source = sources.open_source(str(listing), "training_data_path")
    assert source.files[0].endswith("/a.png") and source.labels == ((0,), (1,))
    assert len(data.scan(source, 2, sources.RecordFormat(), 0.0).keys) == 2


def test_nothing_decodable_is_an_error_even_when_corruption_is_allowed(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("bad.jpg 0\n")
    source = sources.open_source(str(listing), "validation_data_path")
    with pytest.raises(data.UserError, match="--validation_data_path: none of its 1 images"):
        data.scan(source, 2, sources.RecordFormat(), 1.0)


def test_a_scan_is_kept_and_reused_for_the_same_data_only(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "train", per_class=3, num_classes=2)
    (tmp_path / "train" / "class_0" / "broken.png").write_bytes(b"\x89PNG broken")
    source = sources.open_source(folder, "training_data_path")
    cache = str(tmp_path / "cache")
    first = data.scan_cached(source, 2, sources.RecordFormat(), 0.5, cache)
    assert first.total == 7 and len(first.keys) == 6 and first.corrupt[0].endswith("broken.png")
    assert len(list((tmp_path / "cache").glob("scan-*.npz"))) == 1

    def no_scan(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr(data, "scan", no_scan)
    again = data.scan_cached(source, 2, sources.RecordFormat(), 0.5, cache)
    np.testing.assert_array_equal(again.keys, first.keys)
    np.testing.assert_array_equal(again.labels, first.labels)  # balancing reads them
    np.testing.assert_array_equal(again.label_splits, first.label_splits)
    assert (again.total, again.corrupt) == (first.total, first.corrupt)
    with pytest.raises(data.UserError, match="1 of 7 images cannot be read"):  # this run's own limit still holds
        data.scan_cached(source, 2, sources.RecordFormat(), 0.0, cache)
    with pytest.raises(AssertionError, match="scanned again"):  # other settings, another key
        data.scan_cached(source, 3, sources.RecordFormat(), 0.5, cache)
    [kept] = (tmp_path / "cache").glob("scan-*.npz")
    kept.write_bytes(b"damaged")  # an unreadable cache file is made again, not an error
    monkeypatch.undo()
    assert data.scan_cached(source, 2, sources.RecordFormat(), 0.5, cache).total == 7


def test_a_kept_scan_names_unreadable_images_as_the_reading_flag_does(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\nbad.png 1\na.png 1\n")
    cache = str(tmp_path / "cache")
    for flag in ("training_data_path", "validation_data_path"):  # the same list for both: one kept scan
        scanned = data.scan_cached(sources.open_source(str(listing), flag), 2, sources.RecordFormat(), 0.5, cache)
        assert scanned.corrupt == (f"{tmp_path / 'bad.png'} (line 2 of --{flag})",)
    assert len(list((tmp_path / "cache").glob("scan-*.npz"))) == 1


def test_the_scan_keeps_each_usable_records_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = [0, 1, 1, 0, 1, 0]
    pictures = [encode(tiny_image(label, rng), "PNG") for label in labels[:5]] + [b"\x89PNG broken"]
    source = sources.open_source(write_tfrecords(tmp_path / "t", labels=labels, images=pictures, shards=2),
                                 "training_data_path")
    scan = data.scan(source, 2, sources.RecordFormat(), 0.5)
    record = [2 * (key & 0xFFFFFFFF) + (key >> 32) for key in scan.keys]  # record i went to shard i % 2
    assert sorted(record) == [0, 1, 2, 3, 4]  # the broken sixth is left out, with its label
    np.testing.assert_array_equal(scan.labels, [labels[i] for i in record])
    np.testing.assert_array_equal(scan.label_splits, np.arange(6))


def test_a_multi_label_scan_keeps_every_label_of_a_record(tmp_path):
    fmt = sources.RecordFormat(several_labels=True)
    path = str(tmp_path / "ml.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for ids in ([1, 4], [2], []):
            feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode(
                np.zeros((8, 8, 3), np.uint8), "PNG")])),
                       "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=ids))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    scan = data.scan(sources.open_source(path, "training_data_path", fmt), 5, fmt, 0.0)
    np.testing.assert_array_equal(scan.labels, [1, 4, 2])
    np.testing.assert_array_equal(scan.label_splits, [0, 2, 3, 3])
    with pytest.raises(data.UserError, match=r"label 4 of .*ml.tfrecord record 0 is outside \[0, 3\) .*\(1 such records"):
        data.scan(sources.open_source(path, "training_data_path", fmt), 3, fmt, 0.0)
