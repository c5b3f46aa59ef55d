"""The README's main job on the bundled digits, timed, with the accuracy it reaches.

Writes the sample (`python -m trainer.sample_data data/digits`) if it is
missing, then runs `python -m trainer.task --flagfile=sample_configs/digits.flags`
in a fresh job-dir under --work, with --backend. From the job-dir it reads
the best top_1_accuracy and its step and the top-1 of every evaluation
(metrics.json), and the training images/s of every progress line
(TensorBoard's images_per_second under logs/train); the wall time is the
trainer process's, start to exit. Records bench/results/quickstart-BACKEND.json.

    python bench/quickstart.py --backend tensorflow [--work /tmp/quickstart]
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import results  # noqa: E402  (found through the path above)


def run(argv, env=None):
    """Runs this interpreter with argv from the repository root, output shown; exits on failure."""
    if subprocess.run([sys.executable, *argv], cwd=ROOT, env=dict(os.environ, **(env or {}))).returncode:
        sys.exit(f"failed: python {' '.join(argv)}")


def training_scalars(job_dir, tag):
    """{step: value} of one of the run's TensorBoard training scalars (one per progress line)."""
    from trainer import cli

    tf = cli.import_tensorflow_quietly()
    from tensorflow.core.util import event_pb2

    values = {}
    for record in tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(job_dir, "logs", "train", "events.out.tfevents.*")))):
        event = event_pb2.Event.FromString(record.numpy())
        for value in event.summary.value:
            if value.tag == tag:
                values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def minutes(seconds):
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default="tensorflow")
    parser.add_argument("--work", default="/tmp/quickstart", help="the job-dir is WORK/BACKEND, emptied first")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(ROOT, "data", "digits")):
        run(["-m", "trainer.sample_data", "data/digits"])
    job_dir = os.path.join(os.path.abspath(args.work), args.backend)
    shutil.rmtree(job_dir, ignore_errors=True)
    started = time.perf_counter()
    run(["-m", "trainer.task", "--flagfile=sample_configs/digits.flags", f"--job-dir={job_dir}", f"--backend={args.backend}"],
        env={"CLOUD_ML_HP_METRIC_FILE": os.path.join(job_dir, "hypertune.metrics")})
    wall = time.perf_counter() - started
    with open(os.path.join(job_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    evaluations, best = metrics["evaluations"], metrics["best"]
    steps = " / ".join(str(e["step"]) for e in evaluations)
    results.record(f"quickstart-{args.backend}",
                   ("backend", "best top_1_accuracy (step)", f"top-1 at steps {steps}",
                    "training img/s (median of the progress lines)", "wall time"),
                   [(args.backend, f"{best['top_1_accuracy']:.4f} ({best['step']})",
                     " / ".join(f"{e['top_1_accuracy']:.4f}" for e in evaluations),
                     round(statistics.median(training_scalars(job_dir, "images_per_second").values())), minutes(wall))])


if __name__ == "__main__":
    main()
