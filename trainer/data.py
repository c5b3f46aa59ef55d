"""Input: check every record of a source once, and feed tf.data.

The sources (folder, image list, TFRecords) are found by sources.py. Before
the first step scan() reads every record once: a label outside
[0, num_classes) is an error naming file and record; an image that cannot be
read or decoded is left out of training and evaluation and counted. The scan
also keeps each usable record's labels, for class balancing. The training
stream's augmentation, mixing and balancing are augment.py's.
label_check() and record_details() give what the scan finds record by record
(for trainer/check_data.py, which reports it); the scan keeps only counts.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os

import numpy as np
import tensorflow as tf

from trainer import augment, cli, files, images
from trainer.cli import UserError
from trainer.sources import RecordFormat, class_names, open_source

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Scan:
    keys: np.ndarray  # usable records, in source order
    total: int  # records in the source, usable or not
    corrupt: tuple  # locations of records that could not be read or decoded
    corrupt_keys: np.ndarray  # their keys
    labels: np.ndarray  # the usable records' label ids, flat, in key order
    label_splits: np.ndarray  # record keys[i] has labels[label_splits[i]:label_splits[i + 1]]


def _tfrecord_records(source, shuffle_seed=None):
    """(key, serialized tf.Example); key = file index << 32 | record index."""
    files = tf.data.Dataset.from_tensor_slices((tf.range(len(source.files), dtype=tf.int64), list(source.files)))
    if shuffle_seed is not None:
        files = files.shuffle(len(source.files), seed=shuffle_seed, reshuffle_each_iteration=True)

    def read(index, filename):
        records = tf.data.TFRecordDataset(filename, buffer_size=8 << 20).enumerate()
        return records.map(lambda i, record: (tf.bitwise.left_shift(index, 32) + i, record))

    return files.interleave(read, cycle_length=min(16, len(source.files)), num_parallel_calls=AUTOTUNE, deterministic=True)


def _parser(fmt):
    """(key, record) -> (key, encoded image, label): an int64 scalar, or a vector of ids for multi-label."""
    label_spec = tf.io.VarLenFeature(tf.int64) if fmt.several_labels else tf.io.FixedLenFeature([], tf.int64)
    spec = {fmt.image_key: tf.io.FixedLenFeature([], tf.string), fmt.label_key: label_spec}

    def parse(key, record):
        example = tf.io.parse_single_example(record, spec)
        label = example[fmt.label_key]
        if fmt.several_labels:
            label = label.values
        return key, example[fmt.image_key], label - fmt.label_offset

    return parse


def _encoded(source, keys, fmt, shuffle_seed=None, read=True):
    """(key, encoded image, label) for the records in `keys` (None = all).

    read=False leaves every record unread (see _reader): the path of a folder's
    or list's image, a TFRecord's serialized tf.Example. Records skipped, or
    left to another worker, then cost no file read (folders, lists) and no
    parse (TFRecords).
    """
    if source.kind == "tfrecord":
        ds = _tfrecord_records(source, shuffle_seed)
        if keys is not None:  # some records were left out by the scan
            keep = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys)), 0)
            ds = ds.filter(lambda key, record: keep.lookup(key) > 0)
    else:
        keys = np.arange(len(source.files), dtype=np.int64) if keys is None else keys
        chosen = [source.labels[k] for k in keys]
        if fmt.several_labels:
            values = np.array([i for ids in chosen for i in ids], dtype=np.int64)
            labels = tf.RaggedTensor.from_row_lengths(values, np.array([len(ids) for ids in chosen], dtype=np.int64))
        else:
            labels = np.array([ids[0] for ids in chosen], dtype=np.int64)
        ds = tf.data.Dataset.from_tensor_slices((keys, np.array(source.files)[keys], labels))
        if shuffle_seed is not None:
            ds = ds.shuffle(len(keys), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.map(_reader(source, fmt), num_parallel_calls=AUTOTUNE) if read else ds


def _reader(source, fmt):
    """An unread record -> (key, encoded image, label): (key, path, label) of a folder or list is read from
    the file, (key, serialized tf.Example) of TFRecords is parsed."""
    if source.kind == "tfrecord":
        return _parser(source.record_format(fmt))
    return lambda key, path, label: (key, tf.io.read_file(path), label)


def scan(source, num_classes, fmt, max_corrupt_fraction):
    """Reads every record once; raises UserError for bad labels or too many corrupt images."""
    all_keys, labels, splits, _, message = label_check(source, num_classes, fmt)
    if message:
        raise UserError(message)
    record = np.repeat(np.arange(len(all_keys)), np.diff(splits))  # of each label
    decodable = _decodable_keys(source, fmt)
    usable = np.isin(all_keys, decodable)
    bad = all_keys[~usable]
    result = Scan(all_keys[usable], len(all_keys), tuple(source.locate(k) for k in bad), bad, labels[usable[record]],
                  _splits(np.diff(splits)[usable]))
    _check_usable(source, result, max_corrupt_fraction)
    return result


def _check_usable(source, result, max_corrupt_fraction):
    corrupt, total = result.corrupt, result.total
    if len(corrupt) > max_corrupt_fraction * total:
        raise UserError(
            f"--{source.flag}: {len(corrupt)} of {total} images cannot be read or decoded (first: {corrupt[0]}); "
            f"fix or remove them, or raise --max_corrupt_fraction"
        )
    if not len(result.keys):
        raise UserError(f"--{source.flag}: none of its {total} images can be read or decoded (first: {corrupt[0]})")


def scan_cached(source, num_classes, fmt, max_corrupt_fraction, cache_dir):
    """scan(), or its result from an earlier run on the same data, kept in cache_dir ("" = no cache).

    The key is what the scan reads: the source's files (names, and for
    TFRecords sizes and modification times), its labels, the label settings
    and num_classes. An image replaced under the same name in a folder or list
    is not noticed: remove the cache folder after editing images in place.
    """
    if not cache_dir:
        return scan(source, num_classes, fmt, max_corrupt_fraction)
    files.makedirs(cache_dir)
    path = os.path.join(cache_dir, f"scan-{_fingerprint(source, fmt, num_classes)}.npz")
    with _scan_lock(path):  # trials started together: one scans, the others wait and read its result
        result = _read_scan(source, path)
        if result is None:
            result = scan(source, num_classes, fmt, max_corrupt_fraction)
            buffer = io.BytesIO()
            np.savez(buffer, **{field: getattr(result, field) for field in _KEPT})
            files.write_atomic(path, buffer.getvalue())
            return result
    _check_usable(source, result, max_corrupt_fraction)  # this run's --max_corrupt_fraction
    cli.say(f"--{source.flag}: the scan of an earlier run on the same data, from {path}")
    return result


def _read_scan(source, path):
    """The Scan kept at path, or None when there is none (or it cannot be read: then it is made again)."""
    if not files.exists(path):
        return None
    try:
        with files.open_file(path, "rb") as f:
            saved = np.load(io.BytesIO(f.read()), allow_pickle=False)
            kept = {field: saved[field] for field in _KEPT}
    except (OSError, ValueError, KeyError):
        return None
    return Scan(corrupt=tuple(source.locate(k) for k in kept["corrupt_keys"]), **{**kept, "total": int(kept["total"])})


_KEPT = ("keys", "total", "corrupt_keys", "labels", "label_splits")  # the Scan fields a kept scan stores


@contextlib.contextmanager
def _scan_lock(path):
    """An exclusive lock beside a local cache file; none for gs:// (trials there may scan twice)."""
    if files.is_remote(path):
        yield
        return
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


SCAN_VERSION = 2  # bump when what scan() finds, or how it is stored, changes


def _fingerprint(source, fmt, num_classes):
    content = [SCAN_VERSION, source.kind, source.files, source.labels, dataclasses.astuple(fmt), num_classes]
    if source.kind == "tfrecord":
        stats = [tf.io.gfile.stat(name) for name in source.files]
        content.append([(s.length, s.mtime_nsec) for s in stats])
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:20]


def _read_labels(source, fmt):
    """Every record's key, and its label ids: flat, record i's in labels[splits[i]:splits[i + 1]]."""
    if source.kind != "tfrecord":
        lengths = [len(ids) for ids in source.labels]
        labels = np.array([i for ids in source.labels for i in ids], dtype=np.int64)
        return np.arange(len(source.files), dtype=np.int64), labels, _splits(lengths)
    ds = _tfrecord_records(source).map(_parser(source.record_format(fmt)), num_parallel_calls=AUTOTUNE)
    ds = ds.map(lambda key, image, label: (key, tf.reshape(label, [-1])))
    ds = ds.ragged_batch(4096).map(_flat_labels)  # large batches: small ones cost seconds of buffer set-up
    try:
        chunks = list(ds.as_numpy_iterator())
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        raise UserError(_describe_tfrecord_error(source, _parser(source.record_format(fmt)), e)) from None
    if not chunks:
        raise UserError(f"--{source.flag}: the TFRecord files hold no records")
    keys, labels, lengths = (np.concatenate([c[i] for c in chunks]) for i in range(3))
    return keys, labels, _splits(lengths)


def _flat_labels(keys, ids):
    """(keys, labels, labels per record) of a batch: ids is ragged, or [B, 1] where every record has one label."""
    if isinstance(ids, tf.RaggedTensor):
        return keys, ids.flat_values, ids.row_lengths()
    return keys, tf.reshape(ids, [-1]), tf.ones_like(keys)


def _splits(lengths):
    """Row splits from row lengths: [0, l0, l0 + l1, ...] (int64)."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _describe_tfrecord_error(source, parse, error):
    """Finds the file (and record) behind a read or parse error, for the message."""
    for filename in source.files:
        records = tf.data.TFRecordDataset(filename).enumerate()
        try:
            for i, record in records:
                parse(i, record)
        except tf.errors.DataLossError:
            return f"--{source.flag}: {filename} is not a TFRecord file (or is truncated)"
        except tf.errors.InvalidArgumentError as e:
            reason = e.message.splitlines()[0]
            return (f"--{source.flag}: {filename} record {int(i)} is not a tf.Example with the expected features "
                    f"({reason}); set --image_key / --label_key, or --task=multi_label for several labels")
    return f"--{source.flag}: cannot read the TFRecords: {error.message.splitlines()[0]}"


def _probe(encoded, fmt):
    """The decoded shape of an image, or an error (which the scan counts as an unreadable image).

    An image whose header declares more than fmt.max_pixels pixels fails before any decoding (a
    decompression bomb costs nothing); ratio=8 decodes JPEGs at 1/8 size: a full pass over the data, cheaply.
    """
    checks = []
    if fmt.max_pixels:
        checks.append(tf.debugging.assert_less_equal(images.header_pixels(encoded), tf.constant(fmt.max_pixels, tf.int64),
                                                     message="more pixels than --max_image_pixels"))
    with tf.control_dependencies(checks):
        return tf.cond(
            images.is_jpeg(encoded),
            lambda: tf.shape(tf.io.decode_jpeg(encoded, channels=3, ratio=8)),
            lambda: tf.shape(images.decode_rgb(encoded)),
        )


def _decodable_keys(source, fmt):
    def probe(key, encoded, label):
        return key, _probe(encoded, fmt)

    ds = _encoded(source, None, fmt).map(probe, num_parallel_calls=AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors().map(lambda key, shape: key).batch(4096)  # large batches cost seconds of buffer set-up
    return np.concatenate(list(ds.as_numpy_iterator()) or [np.zeros([0], np.int64)])


def label_check(source, num_classes, fmt):
    """The scan's label pass, record by record: (keys, labels, label_splits, bad, message).

    keys, labels and label_splits are every record's, as _read_labels() reads them; bad holds the
    indices (into keys) of the records with a label outside [0, num_classes) (num_classes None: any
    label >= 0, an open set), and message the error scan() raises for them ("" when there are none).
    """
    keys, labels, splits = _read_labels(source, fmt)
    record = np.repeat(np.arange(len(keys)), np.diff(splits))  # of each label
    bad = np.flatnonzero((labels < 0) | (labels >= (num_classes or np.iinfo(np.int64).max)))
    if not bad.size:
        return keys, labels, splits, np.zeros([0], np.int64), ""
    offset = 0 if source.kind == "folder" else fmt.label_offset  # folder labels are subfolder positions
    allowed = f"[0, {num_classes})" if num_classes else "[0, inf) (ids of any class)"
    message = (
        f"--{source.flag}: label {labels[bad[0]] + offset} of {source.locate(keys[record[bad[0]]])} is outside "
        f"{allowed} after --label_offset={offset} ({len(np.unique(record[bad]))} such records; "
        "check --num_classes and --label_offset)"
    )
    return keys, labels, splits, np.unique(record[bad]), message


def record_details(source, fmt, batch_size=256):
    """scan()'s image pass, record by record: numpy batches of (keys, encoded images, heights, widths).

    Only the records the scan's probe decodes come (the others are what scan() counts as corrupt), in
    no particular order; a JPEG's size is its header's (the probe decodes it at 1/8). Streamed: one
    batch of encoded images at a time is held, whatever the size of the source.
    """
    def probe(key, encoded, label):
        shape = _probe(encoded, fmt)  # the scan's probe: what it decodes is what the scan keeps
        size = tf.cond(images.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2], lambda: shape[:2])
        return key, encoded, size, shape

    ds = _encoded(source, None, fmt).map(probe, num_parallel_calls=AUTOTUNE, deterministic=False)
    # The probe's shape goes through ignore_errors() and is dropped only after it: an unused decode is pruned.
    ds = ds.ignore_errors().map(lambda key, encoded, size, shape: (key, encoded, size[0], size[1]))
    return ds.batch(batch_size).prefetch(2).as_numpy_iterator()


def training_dataset(source, scan_result, fmt, target, batch_size, image_size, num_classes, seed, min_area, flip,
                     start_step=0, *, augmentation="basic", randaugment_magnitude=0.5, random_erasing=0.0,
                     mixup_alpha=0.0, cutmix_alpha=0.0, class_balancing="none", worker=0, workers=1):
    """Endless shuffled batches of (uint8 images, float targets[, per-image loss weights]): worker's
    rows of every global batch of batch_size images.

    A pure function of (seed, step): resuming at start_step skips exactly the
    records an uninterrupted run consumed, and gives them the same crops, flips,
    augmentations, mixes and sampler draws. The options are the flags' (augment.py).

    With several worker processes, each reads and decodes only its rows:
    worker i the i-th of `workers` equal, consecutive parts of each global
    batch, so the workers' batches of a step, in worker order, are the
    one-process batch. Mixing is the exception: each worker mixes its own rows
    (pairs never cross workers), with draws from (seed, step, worker).
    """
    keys = scan_result.keys if len(scan_result.keys) < scan_result.total else None
    ds = _encoded(source, keys, fmt, shuffle_seed=seed, read=False)  # read below: only this worker's records
    if source.kind == "tfrecord":
        ds = ds.shuffle(min(scan_result.total, 16384), seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat()
    label_rows = (scan_result.labels, scan_result.label_splits, num_classes)
    if class_balancing == "sampler":  # every worker draws for every record: the same kept stream everywhere
        keep = augment.sampler_filter(scan_result.keys, augment.sampler_acceptance(*label_rows), seed)
        ds = ds.enumerate().filter(keep).map(lambda index, element: element)
    weights = augment.key_table(scan_result.keys, augment.loss_weights(*label_rows)) if class_balancing == "weights" else None
    start = start_step * batch_size
    ds = ds.skip(start).enumerate(start=start)  # index: the image's position in the global stream
    rows = batch_size // workers  # this worker's batch
    if workers > 1:
        ds = ds.filter(lambda index, element: index // rows % workers == worker)
    image = augment.image_pipeline(augmentation, image_size, min_area, flip, randaugment_magnitude, random_erasing, seed)
    read = _reader(source, fmt)

    def prepare(index, element):
        key, encoded, label = read(*element)  # after skip() and the worker's filter: no record is read twice
        example = (image(encoded, index), target(label, num_classes))
        return example if weights is None else (*example, weights.lookup(key))

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True).batch(rows, drop_remainder=True)
    mix = augment.batch_mixer(mixup_alpha, cutmix_alpha, seed, worker)
    if mix is not None:
        ds = ds.enumerate(start=start_step).map(mix, num_parallel_calls=AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    # One process's stream is the whole global batch, which a strategy splits over its devices;
    # a worker's stream is its share already.
    policy = tf.data.experimental.AutoShardPolicy
    options.experimental_distribute.auto_shard_policy = policy.DATA if workers == 1 else policy.OFF
    return ds.prefetch(AUTOTUNE).with_options(options)


def eval_dataset(source, scan_result, fmt, target, batch_size, image_size, num_classes, num_images=0, seed=0):
    """num_images usable records (0 = all) chosen by a seeded draw, centrally cropped, in source order.

    A draw rather than the first N: folders and lists are sorted by class, so
    the first N would cover only the first classes.
    """
    keys = scan_result.keys if len(scan_result.keys) < scan_result.total else None
    count = len(scan_result.keys) if num_images == 0 else min(num_images, len(scan_result.keys))
    if count < len(scan_result.keys):
        keys = np.sort(np.random.RandomState(seed).choice(scan_result.keys, count, replace=False))
    ds = _encoded(source, keys, fmt)
    ds = ds.take(count).map(
        lambda key, encoded, label: (images.eval_image(encoded, image_size), target(label, num_classes)),
        num_parallel_calls=AUTOTUNE,
    )
    ds = ds.apply(tf.data.experimental.assert_cardinality(count))  # lets Keras restart it each evaluation
    if count * image_size * image_size * 3 < 512 << 20:
        ds = ds.cache()  # small enough to keep decoded in memory between evaluations
    return ds.batch(batch_size).prefetch(AUTOTUNE), count


@dataclasses.dataclass(frozen=True)
class Inputs:
    training: object  # endless (uint8 images, float targets[, loss weights]) batches from start_step on: this worker's share
    evaluation: object  # the evaluation batches, the same images every evaluation
    class_names: tuple  # in label order
    summary: dict  # image counts and unreadable images, for metrics.json
    batch_size: int  # the global training batch (lowered from --train_batch_size when the data is small)
    training_images: int  # usable training images (an epoch is training_images // batch_size steps)


def prepare_inputs(training_path, validation_path, num_classes, task, *, image_key, label_key, label_offset,
                   label_map_path, max_corrupt_fraction, max_image_pixels, tfds_data_dir, scan_cache_dir, image_size, train_batch_size,
                   eval_batch_size, num_eval_images, seed, random_crop_min_area, random_flip, augmentation,
                   randaugment_magnitude, mixup_alpha, cutmix_alpha, random_erasing, class_balancing,
                   max_batch_fraction, replicas, start_step, worker=0, workers=1):
    """Opens and scans both sources (every bad label or unreadable image is found here, before any step),
    and returns the two datasets with the class names and the training batch (see fitted_batch_size).
    The training dataset is worker's share of each batch, of `workers` processes (training_dataset)."""
    fmt = RecordFormat(image_key, label_key, label_offset, task.several_labels, max_image_pixels)
    train_source = open_source(training_path, "training_data_path", fmt, tfds_data_dir)
    eval_source = open_source(validation_path, "validation_data_path", fmt, tfds_data_dir)
    names = class_names(train_source, eval_source, num_classes, label_map_path, task.open_set)
    cli.say(f"scanning {training_path} and {validation_path} ...")
    train_scan = scan_cached(train_source, num_classes, fmt, max_corrupt_fraction, scan_cache_dir)
    # An open-set task's validation classes may be unseen in training: any id is data there.
    eval_scan = scan_cached(eval_source, None if task.open_set else num_classes, fmt, max_corrupt_fraction,
                            scan_cache_dir)
    cli.say(f"{len(train_scan.keys)} training images, {len(eval_scan.keys)} validation images, "
            f"{len(train_scan.corrupt) + len(eval_scan.corrupt)} unreadable skipped")
    batch_size = fitted_batch_size(train_batch_size, len(train_scan.keys), max_batch_fraction, replicas)
    training = training_dataset(
        train_source, train_scan, fmt, task.target, batch_size, image_size, num_classes, seed, random_crop_min_area,
        random_flip, start_step, augmentation=augmentation, randaugment_magnitude=randaugment_magnitude,
        random_erasing=random_erasing, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
        class_balancing=class_balancing, worker=worker, workers=workers)
    evaluation, num_eval = eval_dataset(eval_source, eval_scan, fmt, task.target, eval_batch_size, image_size,
                                        num_classes, num_eval_images, seed)
    summary = {
        "training_images": len(train_scan.keys), "evaluation_images": num_eval,
        "corrupt_images": {"training": len(train_scan.corrupt), "validation": len(eval_scan.corrupt),
                           "examples": list((train_scan.corrupt + eval_scan.corrupt)[:20])},
    }
    return Inputs(training, evaluation, names, summary, batch_size, len(train_scan.keys))


def fitted_batch_size(batch_size, training_images, max_fraction, replicas):
    """batch_size, or when it is more than max_fraction of the training images (0 = never), the largest
    multiple of replicas within that fraction (at least replicas), with a line saying so."""
    limit = math.floor(max_fraction * training_images + 1e-9)  # images; the epsilon absorbs 0.29 * 100 = 28.999...
    if not max_fraction or batch_size <= limit:
        return batch_size
    lowered = max(replicas, limit // replicas * replicas)
    if lowered < batch_size:
        cli.say(f"--train_batch_size lowered from {batch_size} to {lowered}: {batch_size} is more than "
                f"--max_batch_fraction={max_fraction:g} of the {training_images} training images")
    return min(lowered, batch_size)
