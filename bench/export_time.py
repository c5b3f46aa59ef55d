"""How long the SavedModel export takes, run after run, and with other programs' unwritten data pending.

Each run is a fresh process that exports the quick start's model (ResNet-18,
10 classes, 32x32) from one weights file, as train.run does at its end, and
times the call. With --dirty_mb, each run first writes that many megabytes
to a scratch file without syncing them, as a `pip install` just before a
first run leaves gigabytes for the kernel to write back: a stall there is
the disk's, not the export's work (the CPU is idle meanwhile).

    python bench/export_time.py --runs 5 [--dirty_mb 2000] [--work /tmp/export-time]
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT = """
import os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from trainer import cli
cli.import_tensorflow_quietly()
from trainer import export
started = time.perf_counter()
export.export_saved_model(sys.argv[1], "resnet-18", "classification", 10, 32, [str(i) for i in range(10)], sys.argv[2])
print(f"{time.perf_counter() - started:.2f}")
"""
WEIGHTS = """
import sys
from trainer import cli
cli.import_tensorflow_quietly()
from trainer import models
models.build_model("resnet-18", 10, 32, seed=0).save_weights(sys.argv[1])
"""


def python(code, *args):
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def dirty(path, megabytes):
    """Writes megabytes to path and returns without syncing: the kernel writes them back later."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dirty_mb", type=int, default=0)
    parser.add_argument("--work", default="/tmp/export-time")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    weights = os.path.join(args.work, "resnet18.weights.h5")
    python(WEIGHTS, weights)
    print("| run | dirty MB written just before | export s | process s |")
    print("|---|---|---|---|")
    for run in range(args.runs):
        if args.dirty_mb:
            dirty(os.path.join(args.work, "dirty.bin"), args.dirty_mb)
        started = time.perf_counter()
        seconds = python(EXPORT, weights, os.path.join(args.work, "model"))
        print(f"| {run + 1} | {args.dirty_mb} | {float(seconds):.2f} | {time.perf_counter() - started:.1f} |", flush=True)
    if args.dirty_mb:
        os.remove(os.path.join(args.work, "dirty.bin"))


if __name__ == "__main__":
    main()
