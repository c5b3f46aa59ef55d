"""Data sources: what images and labels a path names, read from the listing alone.

A path is one of three sources (chosen by its form):
  * a folder with one subfolder per class (class = subfolder, sorted by name);
    hidden entries (`.ipynb_checkpoints/`, `._x.jpg`) are not classes or
    images, and a class subfolder without images is an error naming it;
  * an image-list file ending in .txt or .lst, `path label` per line, paths
    relative to the list's folder unless absolute or gs://; the label is
    the last field, so a path may hold spaces;
  * otherwise TFRecord files of tf.Example records (their labels are read by
    the scan in data.py): a glob, or a folder without subfolders that holds
    them (a SageMaker channel, a Beam or Spark job's output), every file in
    it but hidden ones (`.x`, `_SUCCESS`), images and lists;
  * `tfds:NAME[/CONFIG][:VERSION]/SPLIT`: a TensorFlow Datasets dataset already
    prepared in --tfds_data_dir, read as the TFRecord files it is, with its
    own image and label features and its ClassLabel's names (nothing is downloaded).
Also the class names, in label order. No image is opened here.
"""

import dataclasses
import os

import tensorflow as tf

from trainer.cli import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
LIST_EXTENSIONS = (".txt", ".lst")


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """How records are read: TFRecord feature keys, the label offset to subtract, one label or several,
    and the most pixels an image's header may declare (0: no limit)."""

    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    label_offset: int = 0
    several_labels: bool = False  # the task's: a list of ids per image
    max_pixels: int = 40_000_000


@dataclasses.dataclass(frozen=True)
class Source:
    flag: str  # the flag that named it, for error messages
    kind: str  # "tfrecord" | "folder" | "list"
    files: tuple  # TFRecord files, or one image path per record
    labels: tuple = ()  # per record, a tuple of label ids, for "folder" and "list"; TFRecords hold their own
    class_names: tuple = ()  # subfolder names for "folder"; the ClassLabel's names for a TFDS dataset
    lines: tuple = ()  # list-file line number per record, for error messages
    features: tuple = ()  # (image key, label key) of a TFDS dataset's records, in place of the flags'

    def record_format(self, fmt):
        """fmt, with this source's own feature keys when it has them."""
        if not self.features:
            return fmt
        return dataclasses.replace(fmt, image_key=self.features[0], label_key=self.features[1])

    def locate(self, key):
        """Where record `key` lives, as a person would look for it."""
        key = int(key)
        if self.kind == "tfrecord":
            return f"{self.files[key >> 32]} record {key & 0xFFFFFFFF}"
        if self.kind == "list":
            return f"{self.files[key]} (line {self.lines[key]} of --{self.flag})"
        return self.files[key]


def open_source(path, flag, fmt=RecordFormat(), tfds_data_dir=""):
    if path.startswith(TFDS_PREFIX):
        return _tfds_source(path, flag, tfds_data_dir, fmt.several_labels)
    if tf.io.gfile.isdir(path):
        return _folder_source(path, flag)
    if path.lower().endswith(LIST_EXTENSIONS):
        return _list_source(path, flag, fmt)
    files = tuple(sorted(tf.io.gfile.glob(path)))
    if not files:
        raise UserError(f"--{flag}: no files match {path!r} (give a TFRecord glob, a folder per class, or a .txt image list)")
    return Source(flag, "tfrecord", files)


TFDS_PREFIX = "tfds:"


def _tfds_source(path, flag, data_dir, several_labels):
    """tfds:NAME[/CONFIG][:VERSION]/SPLIT, prepared under data_dir: its split's TFRecord files."""
    name, _, split = path[len(TFDS_PREFIX):].rpartition("/")
    if not name or not split:
        raise UserError(f"--{flag}={path}: expected tfds:NAME[/CONFIG][:VERSION]/SPLIT, e.g. tfds:mnist/train")
    import tensorflow_datasets as tfds

    data_dir = data_dir or None  # TFDS's own default, ~/tensorflow_datasets
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        builder, prepared = None, False
        reason = str(e).splitlines()[0]
    if not prepared:
        where = data_dir or "~/tensorflow_datasets"
        raise UserError(f"--{flag}={path}: {name} is not prepared in {where} (nothing is downloaded while training); "
                        f"prepare it once with `tfds build {name.split(':')[0]} --data_dir={where}` where the network "
                        f"is reachable, then give --tfds_data_dir={where}" + ("" if builder else f" ({reason})"))
    splits = builder.info.splits
    if split not in splits:
        raise UserError(f"--{flag}={path}: {name} has no split {split!r}; it has {', '.join(sorted(splits))}")
    if str(builder.info.file_format).lower().split(".")[-1] != "tfrecord":
        raise UserError(f"--{flag}={path}: {name} is stored as {builder.info.file_format}; only TFRecord is read")
    image_key, label_key, names = _tfds_features(builder.info.features, several_labels, flag, path)
    files = tuple(str(p) for p in splits[split].filepaths)
    return Source(flag, "tfrecord", files, class_names=names, features=(image_key, label_key))


def _tfds_features(features, several_labels, flag, path):
    """(image key, label key, class names) of a dataset's features: its one Image and its ClassLabel
    (multi_label: a Sequence of ClassLabel)."""
    import tensorflow_datasets as tfds

    image = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if several_labels:
        labels = [k for k, f in features.items() if isinstance(f, tfds.features.Sequence)
                  and isinstance(f.feature, tfds.features.ClassLabel)]
    else:
        labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if len(image) != 1 or len(labels) != 1:
        wanted = "a Sequence of ClassLabel" if several_labels else "a ClassLabel"
        raise UserError(f"--{flag}={path}: expected one Image feature and one {wanted} feature, found "
                        f"{', '.join(f'{k} ({type(f).__name__})' for k, f in features.items())}")
    label = features[labels[0]]
    names = tuple((label.feature if several_labels else label).names)
    return image[0], labels[0], names


def _folder_source(path, flag):
    entries = [name for name in tf.io.gfile.listdir(path) if not name.startswith(".")]  # .ipynb_checkpoints, .git
    classes = sorted(d.rstrip("/") for d in entries if tf.io.gfile.isdir(os.path.join(path, d)))
    if not classes:
        shards = sorted(os.path.join(path, name) for name in entries if _may_be_records(name))
        if shards:
            return Source(flag, "tfrecord", tuple(shards))
        raise UserError(f"--{flag}: folder {path} has no class subfolders (expected one subfolder of images per "
                        "class) and no TFRecord files")
    files, labels = [], []
    for label, name in enumerate(classes):
        images = [entry for entry in sorted(tf.io.gfile.listdir(os.path.join(path, name)))
                  if entry.lower().endswith(IMAGE_EXTENSIONS) and not entry.startswith(".")]  # ._x.jpg: macOS metadata
        if not images and len(classes) > 1:
            raise UserError(f"--{flag}: class folder {os.path.join(path, name)} holds no "
                            f"{'/'.join(IMAGE_EXTENSIONS)} images; every subfolder is a class: add its images, or "
                            "remove it from both data folders (and lower --num_classes)")
        files += [os.path.join(path, name, entry) for entry in images]
        labels += [(label,)] * len(images)
    if not files:
        raise UserError(f"--{flag}: no {'/'.join(IMAGE_EXTENSIONS)} files in the class subfolders of {path}")
    return Source(flag, "folder", tuple(files), tuple(labels), tuple(classes))


def _may_be_records(name):
    """A file of a folder of TFRecord shards: their names vary (train-00000-of-00128, x.tfrecord, x.tfrec)."""
    return not name.startswith((".", "_")) and not name.lower().endswith(IMAGE_EXTENSIONS + LIST_EXTENSIONS)


def _list_source(path, flag, fmt):
    if not tf.io.gfile.exists(path):
        raise UserError(f"--{flag}: image list {path} does not exist")
    base = os.path.dirname(path)
    files, labels, lines = [], [], []
    with tf.io.gfile.GFile(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.lstrip("\ufeff") if number == 1 else line  # a byte-order mark from Windows editors
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            location, ids = _split_line(line.strip(), fmt.several_labels)
            if ids is None:
                expected = "'image_path id,id,...'" if fmt.several_labels else "'image_path integer_label'"
                raise UserError(f"--{flag}: {path} line {number}: expected {expected}, got {line.strip()!r}")
            image = location if location.startswith(("/", "gs://")) else os.path.join(base, location)
            files.append(image)
            labels.append(tuple(i - fmt.label_offset for i in ids))
            lines.append(number)
    if not files:
        raise UserError(f"--{flag}: image list {path} has no 'path label' lines")
    return Source(flag, "list", tuple(files), tuple(labels), lines=tuple(lines))


def _split_line(text, several_labels):
    """(image path, label ids) of a list line: the label is the last field, the path all before it (spaces
    included); a multi-label line may have no label field. ids is None when the line does not parse."""
    parts = text.rsplit(None, 1)
    ids = _parse_label_field(parts[1], several_labels) if len(parts) == 2 else None
    if ids is not None:
        return parts[0], ids
    return text, _parse_label_field(None, several_labels)  # the whole line is a path: fine for multi-label


def _parse_label_field(field, several_labels):
    """'3' -> (3,); multi-label also '1,4,7' and no field at all (an image with no label)."""
    if field is None:
        return () if several_labels else None
    items = field.split(",") if several_labels else [field]
    if not all(item.strip().lstrip("-").isdigit() for item in items):
        return None
    return tuple(int(item) for item in items)


def class_names(train_source, eval_source, num_classes, label_map_path, open_set=False):
    """Names in label order: the label map, else the training subfolders, else '0'..'N-1'.

    open_set: the validation classes may differ from the training ones (metric learning), so a validation
    folder's subfolders need not match.
    """
    if (train_source.kind == "folder" and eval_source.kind == "folder" and not open_set
            and train_source.class_names != eval_source.class_names):
        raise UserError("--validation_data_path: its class subfolders differ from those of --training_data_path")
    if label_map_path:
        if not tf.io.gfile.exists(label_map_path):
            raise UserError(f"--label_map_path: {label_map_path} does not exist")
        with tf.io.gfile.GFile(label_map_path) as f:
            names = tuple(line.strip() for line in f if line.strip())
        if len(names) != num_classes:
            raise UserError(f"--label_map_path: {label_map_path} names {len(names)} classes but --num_classes={num_classes}")
        if train_source.kind == "folder" and names != train_source.class_names:
            raise UserError(f"--label_map_path: {label_map_path} does not list the class subfolders of --training_data_path "
                            f"in their (sorted) label order: {', '.join(train_source.class_names)}")
        return names
    if train_source.kind == "folder":
        if len(train_source.class_names) != num_classes:
            raise UserError(f"--num_classes={num_classes} but --training_data_path has {len(train_source.class_names)} class subfolders")
        return train_source.class_names
    if train_source.class_names:  # a TFDS dataset's ClassLabel
        if len(train_source.class_names) != num_classes:
            raise UserError(f"--num_classes={num_classes} but --training_data_path's dataset has "
                            f"{len(train_source.class_names)} classes")
        return train_source.class_names
    return tuple(str(i) for i in range(num_classes))
