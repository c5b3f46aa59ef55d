"""How long the SavedModel export takes, run after run: alone, after other programs' unwritten data, and in the trainer.

Isolated runs: each is a fresh process that exports the quick start's model
(ResNet-18, 10 classes, 32x32) from one weights file, as train.run does at
its end, and times the call. With --dirty_mb, as many runs again, each after
writing that many megabytes to a scratch file without syncing them, as a
`pip install` just before a first run leaves gigabytes for the kernel to write
back: a stall there is the disk's, not the export's work (the CPU is idle
meanwhile). With --quickstarts, that many short quick starts (the sample's
flags, 20 steps, one evaluation; a fresh job-dir each) whose export is timed
inside the trainer, from the `exported in S s` line it prints. The CPU idle
column is the export's wall time less the CPU time of all its threads: time
spent waiting, mostly for the disk to take the files (the export syncs them).

Records one table (bench/results/export-time.json, or export-time-NAME.json
with --name): the median, the largest and every value of each kind of run.
--work on a slow disk (a throttled mount) shows what the export does there.

    python -m trainer.sample_data data/digits
    python bench/export_time.py --runs 5 [--dirty_mb 3000] [--quickstarts 20] [--work /tmp/export-time] [--name NAME]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import results  # noqa: E402  (found through the path above)

EXPORT = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from trainer import cli
cli.import_tensorflow_quietly()
from trainer import export
exported = export.export_saved_model(sys.argv[1], "resnet-18", "classification", 10, 32, [str(i) for i in range(10)],
                                     sys.argv[2])
print(exported.line())
print(exported.seconds, exported.cpu_seconds)
"""
WEIGHTS = """
import sys
from trainer import cli
cli.import_tensorflow_quietly()
from trainer import models
models.build_model("resnet-18", 10, 32, seed=0).save_weights(sys.argv[1])
"""
QUICKSTART = ["--flagfile=sample_configs/digits.flags", "--max_steps=20", "--eval_frequency=20", "--warmup_steps=10"]


def python(argv, env=None):
    """Runs this interpreter with argv from the repository root; returns its stdout."""
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))
    if result.returncode:
        sys.exit(f"failed: python {' '.join(argv)}\n{result.stderr[-3000:]}")
    return result.stdout


def dirty(path, megabytes):
    """Writes megabytes to path and returns without syncing: the kernel writes them back later."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)


def isolated_export(weights, work, dirty_mb):
    """(seconds, CPU-idle seconds) of one export in a fresh process, after writing dirty_mb unsynced megabytes."""
    if dirty_mb:
        dirty(os.path.join(work, "dirty.bin"), dirty_mb)
    *_, line, figures = python(["-c", EXPORT, weights, os.path.join(work, "model")]).splitlines()
    seconds, cpu_seconds = map(float, figures.split())
    print(f"isolated export{f' after {dirty_mb} MB' if dirty_mb else ''}: {line}", flush=True)
    return seconds, max(seconds - cpu_seconds, 0.0)


def quickstart_export(job_dir):
    """(seconds, CPU-idle seconds or None) of the export inside one short quick start, from the trainer's line
    (which names the idle time only when it is long)."""
    shutil.rmtree(job_dir, ignore_errors=True)
    out = python(["-m", "trainer.task", *QUICKSTART, f"--job-dir={job_dir}"],
                 env={"CLOUD_ML_HP_METRIC_FILE": os.path.join(job_dir, "hypertune.metrics")})
    line = re.search(r"^exported in .*$", out, re.MULTILINE).group(0)
    idle = re.search(r"idle for ([\d.]+) s", line)
    print(f"quick start: {line}", flush=True)
    return float(line.split()[2]), float(idle.group(1)) if idle else None


def summary(what, runs):
    seconds, idle = [run[0] for run in runs], [run[1] for run in runs if run[1] is not None]
    return (what, len(seconds), round(statistics.median(seconds), 1), round(max(seconds), 1),
            ", ".join(f"{s:.1f}" for s in seconds),
            round(statistics.median(idle), 1) if idle else "under 3 in every run")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="isolated exports (and as many again with --dirty_mb)")
    parser.add_argument("--dirty_mb", type=int, default=0)
    parser.add_argument("--quickstarts", type=int, default=0, help="short quick starts, each timing its own export")
    parser.add_argument("--work", default="/tmp/export-time")
    parser.add_argument("--name", default="", help="records export-time-NAME.json (a run on other storage)")
    args = parser.parse_args()
    if args.quickstarts and not os.path.isdir(os.path.join(ROOT, "data", "digits")):
        sys.exit("error: data/digits is missing: write it first with python -m trainer.sample_data data/digits")
    os.makedirs(args.work, exist_ok=True)
    weights = os.path.join(args.work, "resnet18.weights.h5")
    python(["-c", WEIGHTS, weights])
    rows = [summary("isolated export, fresh process", [isolated_export(weights, args.work, 0) for _ in range(args.runs)])]
    if args.dirty_mb:
        rows.append(summary(f"isolated export, {args.dirty_mb:,} MB written unsynced just before",
                            [isolated_export(weights, args.work, args.dirty_mb) for _ in range(args.runs)]))
        os.remove(os.path.join(args.work, "dirty.bin"))
    if args.quickstarts:
        rows.append(summary("inside a quick start (" + " ".join(QUICKSTART[1:]) + ")",
                            [quickstart_export(os.path.join(args.work, f"quickstart-{i}")) for i in range(args.quickstarts)]))
    results.record("export-time" + (f"-{args.name}" if args.name else ""),
                   ("export", "runs", "median s", "max s", "every run, s", "CPU idle, median s"), rows)


if __name__ == "__main__":
    main()
