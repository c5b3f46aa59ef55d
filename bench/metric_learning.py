"""Metric learning on the bundled digits: retrieval of seen and of unseen classes, for each margin loss.

The training split's digits 0-6 train a ResNet-18 (32x32, 128-wide embedding)
with `--task=metric_learning` and each --metric_loss at PAI's defaults; the
run evaluates retrieval on the validation split's 0-6 (held-out images of the
training classes), which picks its best evaluation. The exported model then
embeds the validation split's 7-9, classes it never saw, and the same exact
retrieval metrics (trainer/retrieval.py) score them. Each run is
`python -m trainer.task` as a user runs it; everything is written under --work.

    python -m trainer.sample_data data/digits
    python bench/metric_learning.py --work /tmp/metric [--losses arcface,cosface] [--max_steps 600]
"""

import argparse
import glob
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

SEEN, UNSEEN = range(7), range(7, 10)
LOSSES = ("amsoftmax", "arcface", "cosface", "large_margin", "sphereface", "softmax")


def split(tf, pattern, classes, path):
    """Writes the records of pattern whose label is in classes to path; returns their count."""
    spec = {"image/class/label": tf.io.FixedLenFeature([], tf.int64)}
    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for record in tf.data.TFRecordDataset(sorted(glob.glob(pattern))):
            if int(tf.io.parse_single_example(record, spec)["image/class/label"]) in classes:
                writer.write(record.numpy())
                count += 1
    return count


def unseen_retrieval(tf, model_dir, path):
    """Retrieval metrics of the exported model's embeddings of the records in path."""
    from trainer import retrieval

    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string), "image/class/label": tf.io.FixedLenFeature([], tf.int64)}
    parsed = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(path)]
    serve = tf.saved_model.load(model_dir).signatures["serving_default"]
    encoded = tf.stack([p["image/encoded"] for p in parsed])
    embeddings = np.concatenate([serve(image_bytes=encoded[i:i + 256])["embeddings"].numpy()
                                 for i in range(0, len(parsed), 256)])
    return retrieval.retrieval_metrics(embeddings, np.array([int(p["image/class/label"]) for p in parsed]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--digits", default=os.path.join(ROOT, "data", "digits"))
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--max_steps", type=int, default=600)
    a = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from trainer import cli

    cli.import_tensorflow_quietly()
    import tensorflow as tf
    os.makedirs(a.work, exist_ok=True)
    data = {name: os.path.join(a.work, f"{name}.tfrecord") for name in ("train", "seen", "unseen")}
    counts = {
        "train": split(tf, os.path.join(a.digits, "train-*.tfrecord"), SEEN, data["train"]),
        "seen": split(tf, os.path.join(a.digits, "validation-*.tfrecord"), SEEN, data["seen"]),
        "unseen": split(tf, os.path.join(a.digits, "validation-*.tfrecord"), UNSEEN, data["unseen"]),
    }
    rows = []
    for loss in a.losses.split(","):
        job_dir = os.path.join(a.work, loss)
        flags = [f"--training_data_path={data['train']}", f"--validation_data_path={data['seen']}",
                 "--task=metric_learning", "--num_classes=7", f"--metric_loss={loss}", "--embedding_size=128",
                 "--model_type=resnet-18", "--image_size=32", f"--max_steps={a.max_steps}",
                 f"--eval_frequency={a.max_steps // 3}", "--train_batch_size=64", "--eval_batch_size=128",
                 "--optimizer_type=momentum", "--initial_learning_rate=0.1", "--warmup_steps=50",
                 "--weight_decay=0.0005", "--random_flip=false", "--random_crop_min_area=0.5",
                 f"--job-dir={job_dir}", "--log_frequency=1000"]
        shutil.rmtree(job_dir, ignore_errors=True)  # a fresh run, not a resume of the last one
        env = dict(os.environ, CLOUD_ML_HP_METRIC_FILE=job_dir + ".metrics")
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "trainer.task", *flags], capture_output=True, text=True,
                                cwd=ROOT, env=env)
        seconds = time.perf_counter() - started
        if result.returncode:
            sys.exit(f"{loss}: the trainer failed\n{result.stderr[-3000:]}")
        best = json.load(open(os.path.join(job_dir, "metrics.json")))["best"]
        unseen = unseen_retrieval(tf, os.path.join(job_dir, "model"), data["unseen"])
        rows.append((loss, best, unseen, seconds))
        print(f"{loss}: seen recall@1 {best['recall_at_1']:.4f}, unseen {unseen['recall_at_1']:.4f} ({seconds:.0f} s)",
              flush=True)

    print(f"training images {counts['train']} (digits 0-6); validation: seen {counts['seen']} (0-6), "
          f"unseen {counts['unseen']} (7-9)")
    results.record("metric-learning",
                   ("--metric_loss", "seen recall@1", "seen MAP@R", "unseen recall@1", "unseen recall@5", "unseen MAP@R",
                    "best step", "wall s"),
                   [(loss, round(best["recall_at_1"], 4), round(best["map_at_r"], 4), round(float(unseen["recall_at_1"]), 4),
                     round(float(unseen["recall_at_5"]), 4), round(float(unseen["map_at_r"]), 4), best["step"], round(seconds))
                    for loss, best, unseen, seconds in rows])


if __name__ == "__main__":
    main()
