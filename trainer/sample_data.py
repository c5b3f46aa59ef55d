"""Writes the bundled sample: scikit-learn's handwritten digits as TFRecords.

    python -m trainer.sample_data data/digits

1,797 real 8x8 grayscale images of the digits 0-9 (shipped inside
scikit-learn, so nothing is downloaded), stored as PNG in tf.Examples with the
trainer's default keys. The held-out split is fixed: 360 images chosen by a
seeded permutation go to validation, the other 1,437 to training.
"""

import os
import sys

import numpy as np

from trainer import cli

NUM_VALIDATION = 360
SPLIT_SEED = 0


def digits_split():
    """(train_images, train_labels, val_images, val_labels) as uint8 [N, 8, 8] and int64 [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    order = np.random.RandomState(SPLIT_SEED).permutation(len(pixels))
    val, train = order[:NUM_VALIDATION], order[NUM_VALIDATION:]
    return pixels[train], digits.target[train], pixels[val], digits.target[val]


def write_tfrecords(pattern, images, labels, num_shards):
    """Writes tf.Examples (image/encoded PNG, image/class/label) into num_shards files."""
    import tensorflow as tf

    paths = [pattern.format(shard=i, num_shards=num_shards) for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for i, (image, label) in enumerate(zip(images, labels)):
        png = tf.io.encode_png(image[..., None]).numpy()
        example = tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
            "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        }))
        writers[i % num_shards].write(example.SerializeToString())
    for w in writers:
        w.close()
    return paths


PROGRAM = cli.Program(
    usage="python -m trainer.sample_data OUTPUT_DIR",
    summary="Writes the bundled sample, scikit-learn's 1,797 handwritten digits (8x8, white ink on black), as "
            "TFRecords: a fixed split of 1,437 training and 360 validation images.",
    example="python -m trainer.sample_data data/digits",
    groups=(),
)


def main(argv):
    if any(arg in ("-h", "--help") for arg in argv[1:]):
        print(cli.help_text(PROGRAM, ()), end="")
        return
    if len(argv) != 2 or argv[1].startswith("-"):
        cli.fail("give one argument, the output folder: python -m trainer.sample_data OUTPUT_DIR")
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    cli.import_tensorflow_quietly()
    train_x, train_y, val_x, val_y = digits_split()
    write_tfrecords(os.path.join(out, "train-{shard:05d}-of-{num_shards:05d}.tfrecord"), train_x, train_y, 2)
    write_tfrecords(os.path.join(out, "validation-{shard:05d}-of-{num_shards:05d}.tfrecord"), val_x, val_y, 1)
    cli.say(f"wrote {len(train_y)} training and {len(val_y)} validation digits to {out}")


if __name__ == "__main__":
    main(sys.argv)
