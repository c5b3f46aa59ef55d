"""What the training recipe's controls do on real data: three experiments on the bundled digits.

1. imbalance: the digits with classes 5-9 cut to a twentieth of their training
   images (0-4 kept whole), trained with --class_balancing=none|weights|sampler
   and with --ohem_top_ratio=0.7; macro recall and the cut classes' recall on
   the (balanced) validation split, from the run report's per_class.csv.
2. recipe: the quick start (sample_configs/digits.flags) as it is, and with
   --augmentation=randaugment --mixup_alpha=0.2 --cutmix_alpha=1.0 --ema_decay=0.999.
3. mosaics: multi-label images of 2-3 digits (64x64, one digit per quadrant),
   trained with the multi-label defaults (whole image, no crop) and with the
   old classification crop (--random_crop_min_area=0.08 --random_flip=true).

Each run is `python -m trainer.task` as a user runs it, in a fresh job-dir;
each experiment records its table (the best evaluation of each run and its
wall time) as bench/results/recipes-*.json. Everything else is written under --work.

    python -m trainer.sample_data data/digits
    python bench/recipes.py --work /tmp/recipes [--only imbalance,recipe,mosaics]
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import results  # noqa: E402  (found through the path above)

CUT = (5, 6, 7, 8, 9)  # classes cut to a twentieth of their training images


def trainer(job_dir, flags):
    """Runs the trainer in a fresh job_dir (a kept one would resume, not train); returns (metrics.json, seconds)."""
    shutil.rmtree(job_dir, ignore_errors=True)
    argv = [sys.executable, "-m", "trainer.task", *flags, f"--job-dir={job_dir}"]
    env = dict(os.environ, CLOUD_ML_HP_METRIC_FILE=os.path.join(job_dir + ".metrics"))
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"{' '.join(argv)}\n{result.stderr[-3000:]}")
    return json.load(open(os.path.join(job_dir, "metrics.json"))), seconds


def write_examples(path, images, label_lists):
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as writer:
        for image, labels in zip(images, label_lists):
            png = tf.io.encode_png(image if image.ndim == 3 else image[..., None]).numpy()
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=list(labels))),
            })).SerializeToString())


def imbalance(work):
    from trainer.sample_data import digits_split

    train_x, train_y, val_x, val_y = digits_split()
    keep = np.concatenate([np.flatnonzero(train_y == c)[:: 20 if c in CUT else 1] for c in range(10)])
    data = os.path.join(work, "imbalanced")
    os.makedirs(data, exist_ok=True)
    write_examples(os.path.join(data, "train.tfrecord"), train_x[keep], [[y] for y in train_y[keep]])
    write_examples(os.path.join(data, "validation.tfrecord"), val_x, [[y] for y in val_y])
    counts = np.bincount(train_y[keep], minlength=10)
    print(f"imbalanced digits: {len(keep)} training images, per class {counts.tolist()}; validation {len(val_y)}")
    base = [f"--flagfile={ROOT}/sample_configs/digits.flags", f"--training_data_path={data}/train.tfrecord",
            f"--validation_data_path={data}/validation.tfrecord", "--max_steps=600", "--eval_frequency=200",
            "--hyperparameter_metric_tag=top_1_accuracy"]
    rows = []
    for name, extra in (("none", []), ("weights", ["--class_balancing=weights"]),
                        ("sampler", ["--class_balancing=sampler"]), ("ohem 0.7", ["--ohem_top_ratio=0.7"])):
        job_dir = os.path.join(work, "imbalance-" + name.replace(" ", "-"))
        metrics, seconds = trainer(job_dir, base + extra)
        with open(os.path.join(job_dir, "report", "per_class.csv")) as f:
            recalls = [float(row["recall"]) for row in csv.DictReader(f)]  # in class-id order
        rows.append((name, round(metrics["best"]["top_1_accuracy"], 4), round(float(np.mean(recalls)), 4),
                     round(float(np.mean([recalls[c] for c in CUT])), 4), round(seconds)))
    results.record("recipes-imbalance",
                   ("--class_balancing / --ohem_top_ratio", "top-1", "macro recall", "recall of the cut classes", "wall s"),
                   rows)


def recipe(work):
    base = [f"--flagfile={ROOT}/sample_configs/digits.flags", f"--training_data_path={ROOT}/data/digits/train-*.tfrecord",
            f"--validation_data_path={ROOT}/data/digits/validation-*.tfrecord"]
    rows = []
    for name, extra in (("quick start", []),
                        ("+ randaugment, mixup 0.2, cutmix 1.0, ema 0.999",
                         ["--augmentation=randaugment", "--mixup_alpha=0.2", "--cutmix_alpha=1.0", "--ema_decay=0.999"])):
        metrics, seconds = trainer(os.path.join(work, "recipe-" + str(len(rows))), base + extra)
        rows.append((name, round(metrics["best"]["top_1_accuracy"], 4), metrics["best"]["step"], round(seconds)))
    results.record("recipes-augmentation", ("digits quick start", "best top-1", "at step", "wall s"), rows)


def mosaics(images, labels, count, rng):
    """count 64x64 images, each 2-3 distinct digits (upscaled to 32x32) in distinct quadrants; their label lists."""
    out, label_lists = np.zeros((count, 64, 64), np.uint8), []
    for i in range(count):
        chosen, wanted = [], rng.integers(2, 4)
        for index in rng.permutation(len(images)):
            if labels[index] not in [labels[j] for j in chosen]:
                chosen.append(index)
            if len(chosen) == wanted:
                break
        for quadrant, index in zip(rng.permutation(4), chosen):
            row, col = divmod(int(quadrant), 2)
            out[i, row * 32:(row + 1) * 32, col * 32:(col + 1) * 32] = np.kron(images[index], np.ones((4, 4), np.uint8))
        label_lists.append(sorted(int(labels[j]) for j in chosen))
    return out, label_lists


def mosaic_runs(work):
    from trainer.sample_data import digits_split

    train_x, train_y, val_x, val_y = digits_split()
    rng = np.random.default_rng(0)
    data = os.path.join(work, "mosaics")
    os.makedirs(data, exist_ok=True)
    write_examples(os.path.join(data, "train.tfrecord"), *mosaics(train_x, train_y, 2000, rng))
    write_examples(os.path.join(data, "validation.tfrecord"), *mosaics(val_x, val_y, 400, rng))
    base = [f"--training_data_path={data}/train.tfrecord", f"--validation_data_path={data}/validation.tfrecord",
            "--task=multi_label", "--num_classes=10", "--model_type=resnet-18", "--image_size=64", "--max_steps=600",
            "--eval_frequency=200", "--train_batch_size=64", "--eval_batch_size=100", "--initial_learning_rate=0.1",
            "--warmup_steps=50", "--weight_decay=0.0005"]
    rows = []
    for name, extra in (("multi_label defaults (whole image, flip)", []),
                        ("old default crop (min area 0.08, flip)", ["--random_crop_min_area=0.08"])):
        metrics, seconds = trainer(os.path.join(work, "mosaic-" + str(len(rows))), base + extra)
        rows.append((name, round(metrics["best"]["mAP"], 4), metrics["best"]["step"], round(seconds)))
    results.record("recipes-mosaics", ("multi-label mosaics, 600 steps", "best mAP", "at step", "wall s"), rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the data sets and runs")
    parser.add_argument("--only", default="imbalance,recipe,mosaics")
    args = parser.parse_args()
    from trainer import cli

    cli.import_tensorflow_quietly()
    os.makedirs(args.work, exist_ok=True)
    experiments = {"imbalance": imbalance, "recipe": recipe, "mosaics": mosaic_runs}
    for name in args.only.split(","):
        experiments[name](args.work)


if __name__ == "__main__":
    main()
