"""The multi-host wiring on one CPU machine: the README's digits job as one process and as two TF_CONFIG workers.

The two workers are two `python -m trainer.task` processes with the same flags
and job-dir and a TF_CONFIG naming both (127.0.0.1, free ports), so the
trainer runs MultiWorkerMirroredStrategy with the global batch of 64 split
32 + 32; only the chief writes the job-dir. Both runs start in a fresh
job-dir. From each it reads the training loss (weight decay included) at
LOSS_STEPS and the images/s of every progress line (TensorBoard), the top-1
of every evaluation (metrics.json) and the wall time. This checks the
wiring, not speed: the workers share the same cores and talk over gRPC.
Records bench/results/two-workers.json.

    python -m trainer.sample_data data/digits
    python bench/two_workers.py [--work /tmp/two-workers]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import quickstart, results  # noqa: E402  (found through the path above)
from tests.test_distributed import free_ports  # noqa: E402  (the same helper as the two-worker test)

FLAGS = ["--flagfile=sample_configs/digits.flags"]
LOSS_STEPS = (100, 500, 900)


def train(job_dir, workers):
    """Runs the trainer as `workers` processes on one job-dir (one: no TF_CONFIG); returns the wall seconds."""
    shutil.rmtree(job_dir, ignore_errors=True)
    addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    processes = []
    started = time.perf_counter()
    for index in range(workers):
        env = dict(os.environ, CLOUD_ML_HP_METRIC_FILE=f"{job_dir}-hypertune-{index}")
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen([sys.executable, "-m", "trainer.task", *FLAGS, f"--job-dir={job_dir}"],
                                          cwd=ROOT, env=env))
    if any(p.wait() for p in processes):
        sys.exit(f"a trainer failed: {[p.returncode for p in processes]}")
    return time.perf_counter() - started


def row(name, job_dir, seconds):
    """The table's row for a finished run: read back from its job-dir (the chief's)."""
    with open(os.path.join(job_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    losses = quickstart.training_scalars(job_dir, "loss")
    rates = quickstart.training_scalars(job_dir, "images_per_second")
    return (name, " / ".join(f"{losses[step]:.3f}" for step in LOSS_STEPS),
            " / ".join(f"{e['top_1_accuracy']:.4f}" for e in metrics["evaluations"]),
            f"{metrics['best']['top_1_accuracy']:.4f} ({metrics['best']['step']})",
            round(statistics.median(rates.values())), quickstart.minutes(seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/two-workers", help="the job-dirs are WORK/one and WORK/two")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(ROOT, "data", "digits")):
        sys.exit("error: data/digits is missing: write it first with python -m trainer.sample_data data/digits")
    work = os.path.abspath(args.work)
    rows = [row(name, os.path.join(work, name), train(os.path.join(work, name), workers))
            for name, workers in (("one", 1), ("two", 2))]
    steps = " / ".join(map(str, LOSS_STEPS))
    results.record("two-workers", ("processes", f"training loss (with weight decay) at step {steps}", "top-1 at each evaluation",
                                   "best (step)", "training img/s (median of the progress lines)", "wall time"), rows)


if __name__ == "__main__":
    main()
