"""Helpers for the hptuning tests: a fake trainer that keeps the real
trainer's contract (flags in, hypertune metrics lines out), study configs that
use it, and two ways to run the study driver: `python -m hptuning.study` as a
process (for what only a process shows: signals, kills, several workers), and
its main() in the test's process (for mistakes in flags, config or storage).

The fake's behaviour per trial is steered by environment variables the driver
passes through: FAKE_CRASH (exit 1 with a traceback) / FAKE_USER_ERROR (exit 2
with an `error:` line naming --FAKE_ERROR_FLAG, training_data_path unless
given) / FAKE_SIGKILL / FAKE_BLOCK / FAKE_NAN list trial numbers;
FAKE_BLOCK_BELOW blocks every trial whose accuracy is below it; FAKE_RUN_LOG
collects one line per trainer start.
"""

import csv
import logging
import os
import signal
import subprocess
import sys

import yaml

from tests.conftest import assert_user_error as assert_one_error_line  # noqa: F401 (re-exported)
from tests.conftest import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_TRAINER = r'''
import json, math, os, signal, sys, time
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
trial = os.environ.get("CLOUD_ML_TRIAL_ID", "0")
def listed(name):
    return trial in os.environ.get(name, "").split(",")
if os.environ.get("FAKE_RUN_LOG"):
    with open(os.environ["FAKE_RUN_LOG"], "a") as f:
        f.write(f"{trial} {os.getpid()}\n")
if listed("FAKE_USER_ERROR"):
    flag = os.environ.get("FAKE_ERROR_FLAG", "training_data_path")
    print(f"error: --{flag}={flags.get(flag, '/no/such/data')}: no files match (fake user error)", file=sys.stderr)
    sys.exit(2)
if listed("FAKE_CRASH"):
    raise RuntimeError("fake crash")  # exit status 1, a traceback in trainer.log
lr = float(flags.get("initial_learning_rate", 0.1))
accuracy = max(0.0, 1 - abs(math.log10(lr) + 1) / 3)  # best at lr = 0.1
if listed("FAKE_NAN"):
    accuracy = float("nan")  # a diverged run
steps = int(flags.get("max_steps", 3))
os.makedirs(os.path.join(flags["job-dir"], "model"), exist_ok=True)
for step in range(1, steps + 1):
    with open(os.environ["CLOUD_ML_HP_METRIC_FILE"], "a") as f:
        line = {"timestamp": time.time(), "trial": trial, "top_1_accuracy": str(accuracy * (0.5 + step / (2 * steps))),
                "global_step": str(step), "checkpoint_path": ""}
        f.write(json.dumps(line) + "\n")
    if step == 1 and listed("FAKE_SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    if step == 1 and (listed("FAKE_BLOCK") or accuracy < float(os.environ.get("FAKE_BLOCK_BELOW", "-1"))):
        time.sleep(60)  # waits to be terminated; a test that gets here has already failed
print(f"top_1_accuracy={accuracy}")
'''


def fake_trainer(tmp_path):
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return str(path)


def write_config(tmp_path, name="study", **overrides):
    """A flat-shape study over the fake trainer; keyword arguments replace top-level keys."""
    config = {
        "trainer_command": [sys.executable, fake_trainer(tmp_path)],
        "trainer_flags": {"max_steps": 3},
        "max_trial_count": 3,
        "sampler": {"type": "random", "seed": 0},
        "parameters": {"initial_learning_rate": {"type": "double", "min": 0.001, "max": 1.0, "scale": "log"}},
    }
    config.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def driver_env(**fake):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in fake.items()})
    return env


def driver_argv(config, job_dir, *flags):
    return [sys.executable, "-m", "hptuning.study", f"--study_config={config}", f"--job-dir={job_dir}",
            "--poll_seconds=0.05", *flags]


def run_driver(config, job_dir, *flags, env=None, timeout=120):
    return subprocess.run(driver_argv(config, job_dir, *flags), cwd=ROOT, env=env or driver_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_driver(config, job_dir, *flags, env=None):
    return subprocess.Popen(driver_argv(config, job_dir, *flags), cwd=ROOT, env=env or driver_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def study_main(capsys, *argv):
    """hptuning.study's main(argv) in this process, as the command would run it; returns a CompletedProcess.

    Puts back what a run changes in the process: absl's parsed values, the
    SIGINT/SIGTERM handlers and Optuna's log handlers.
    """
    from hptuning import study

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    optuna_log = logging.getLogger("optuna")
    log_handlers = list(optuna_log.handlers)
    study.FLAGS.unparse_flags()  # absl keeps values between parses
    try:
        return run_main(study.main, argv, capsys)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        optuna_log.handlers[:] = log_handlers


def read_trials(job_dir):
    with open(os.path.join(job_dir, "trials.csv")) as f:
        return list(csv.DictReader(f))


def trials_by_number(job_dir):
    return {int(t["number"]): t for t in read_trials(job_dir)}


def run_log(path):
    """Trial numbers in the order the fake trainer started them."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line.split()[0]) for line in f if line.strip()]
