"""Where a study trial's first seconds go: a one-step run of the quickstart, timed by phase.

Runs `python -m trainer.task` with the sample's flag file, one step, one
evaluation and the export, and timestamps each line it prints from process
start: imports (until "scanning"), the data scan, the model build and first
step, the first evaluation, the export and run report, and the whole process;
then the trainer's CPU seconds (user + sys), which a busy machine inflates
less than the wall-clock figures; records the table as
bench/results/trial-startup.json. The first run scans the data into a fresh
--scan_cache_dir, as a study's first trial does; the later runs read it, as
the other trials do.

    python -m trainer.sample_data data/digits
    python bench/trial_startup.py --runs 4
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import results  # noqa: E402  (found through the path above)

MARKS = (("imports", "scanning "), ("data scan", " training images, "), ("build and first step", "step "),
         ("first evaluation", "eval at step"), ("export and run report", "top_1_accuracy="))


def timed_run(flagfile, job_dir, cache_dir):
    """Seconds from start to each phase's end, and the whole process."""
    argv = [sys.executable, "-m", "trainer.task", f"--flagfile={flagfile}", f"--job-dir={job_dir}", "--max_steps=1",
            "--eval_frequency=1", "--warmup_steps=0", "--log_frequency=1", f"--scan_cache_dir={cache_dir}"]
    env = dict(os.environ, CLOUD_ML_HP_METRIC_FILE=os.path.join(job_dir, "hypertune.metrics"))
    started, seen = time.perf_counter(), {}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        for name, prefix in MARKS:
            if name not in seen and (line.startswith(prefix) or (name == "data scan" and prefix in line)):
                seen[name] = time.perf_counter() - started
    _, status, usage = os.wait4(proc.pid, 0)  # the trainer's own CPU seconds: less sensitive to a loaded machine
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the trainer failed: {' '.join(argv)}")
    seen["whole process"] = time.perf_counter() - started
    seen["cpu"] = usage.ru_utime + usage.ru_stime
    return seen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flagfile", default=os.path.join(ROOT, "sample_configs", "digits.flags"))
    p.add_argument("--runs", type=int, default=4, help="the first scans; the others read its kept scan")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "scan-cache")
        runs = [timed_run(a.flagfile, os.path.join(tmp, f"job{i}"), cache) for i in range(a.runs)]
    names = [name for name, _ in MARKS]
    rows = []
    for i, seen in enumerate(runs):
        cells, previous = [], 0.0
        for name in names:  # a phase's own seconds: from the previous mark to its own
            end = seen.get(name)
            cells.append(None if end is None else round(end - previous, 2))
            previous = end if end is not None else previous
        label = "first (scans)" if i == 0 else f"{i + 1} (kept scan)"
        rows.append((label, *cells, round(seen["whole process"], 2), round(seen["cpu"], 2)))
    results.record("trial-startup", ("run", *names, "whole process", "CPU (user + sys)"), rows)


if __name__ == "__main__":
    main()
