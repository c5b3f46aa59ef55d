"""CPU input throughput: the trainer's training pipeline against a plain tf.data map.

    python bench/input_pipeline.py --num_images=512 --image_size=224

Writes --num_images JPEGs of 500x375 (ImageNet-sized: smooth colour fields
plus noise, quality 90) into a temporary folder, then measures images/s of

  * ours: trainer.data.training_dataset (read, fused decode-and-crop of a random
    resized crop, resize, flip, batch), exactly what `fit` consumes;
  * plain: read_file -> decode_jpeg -> resize -> flip, the map a hand-written
    Keras script would use (no random crop, so less work in principle);

each on one core (tf.data's private thread pool of 1, intra-op parallelism 1)
and on every core; and beside them the img/s one GPU trains ResNet-50 at
(bench/results/gpu-vs-timm-resnet-50.json, the trainer's step fed from
host memory) and how many cores of this kind decoding at
the one-core rate keep up with it. Records the table as
bench/results/input-pipeline.json.
"""

import argparse
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf

from bench import results
from trainer import data, sources
from trainer.tasks import CLASSIFICATION


def write_jpegs(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "class_0"))
    os.makedirs(os.path.join(folder, "class_1"))
    y, x = np.mgrid[0:375, 0:500]
    for i in range(count):
        base = np.stack([np.sin(x / rng.uniform(20, 80) + c) * 100 + np.cos(y / rng.uniform(20, 80)) * 60 for c in range(3)], -1)
        pixels = np.clip(base + 128 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        encoded = tf.io.encode_jpeg(pixels, quality=90).numpy()
        with open(os.path.join(folder, f"class_{i % 2}", f"{i}.jpg"), "wb") as f:
            f.write(encoded)


def single_core(ds, cores):
    options = tf.data.Options()
    if cores == 1:
        options.threading.private_threadpool_size = 1
        options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def images_per_second(ds, batches, batch_size):
    iterator = iter(ds)
    next(iterator)  # warm-up: thread pools, first file reads
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def ours(folder, image_size, batch_size):
    source = sources.open_source(folder, "training_data_path")
    scan = data.scan(source, 2, sources.RecordFormat(), 0.0)
    return data.training_dataset(source, scan, sources.RecordFormat(), CLASSIFICATION.target, batch_size, image_size, 2, seed=0,
                                 min_area=0.08, flip=True)


def plain(folder, image_size, batch_size):
    paths = sorted(tf.io.gfile.glob(os.path.join(folder, "*", "*.jpg")))

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        image = tf.image.resize(image, [image_size, image_size])
        return tf.cast(tf.image.random_flip_left_right(image), tf.uint8)

    ds = tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths)).repeat()
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


GPU_RESULT = os.path.join("bench", "results", "gpu-vs-timm-resnet-50.json")


def one_gpu_rate():
    """(img/s, what measured it) of the last recorded one-GPU ResNet-50 run of the trainer's step, fed from host memory."""
    gpu = results.load(GPU_RESULT)
    rate = gpu["rows"][0][gpu["columns"].index("ours img/s (from host memory)")]
    return rate, f"ResNet-50 on {gpu['machine'].split(', ')[-1].split(' x ')[-1]}, {gpu['date'][:16]} UTC"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=16, help="timed batches per measurement")
    args = parser.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, args.num_images)
        rows = []
        gpu_rate, measured = one_gpu_rate()
        for name, build in (("ours (random resized crop, fused decode)", ours), ("plain decode_jpeg + resize", plain)):
            ds = build(folder, args.image_size, args.batch_size)
            rates = [round(images_per_second(single_core(ds, n), args.batches, args.batch_size)) for n in (1, cores)]
            rows.append((name, *rates, gpu_rate, math.ceil(gpu_rate / rates[0])))
    results.record("input-pipeline", ("pipeline", "img/s on 1 core", f"img/s on {cores} cores",
                                      f"one GPU trains at, img/s ({measured})", "cores to feed it"), rows)


if __name__ == "__main__":
    main()
