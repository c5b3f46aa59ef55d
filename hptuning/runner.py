"""One trial: the trainer as its own process, in its own job-dir, with its own
hypertune metrics file that the driver reads as evaluations land.

Each evaluation goes to Optuna as an intermediate value at the trainer's
global_step; when the pruner says stop, the process is terminated. The trial's
value is its best evaluation (or its last, with measurement: last).
"""

import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import threading

import optuna

from hptuning import params as params_lib
from hptuning import spec as spec_lib

METRICS_FILE = "hypertune.metrics"
LOG_FILE = "trainer.log"
TERMINATE_GRACE_SECONDS = 30  # SIGTERM first, SIGKILL if the trainer has not exited by then
_PR_SET_PDEATHSIG = 1
# Set when the driver is told to stop (Ctrl-C, SIGTERM): every running trial stops its
# trainer and is marked interrupted, to run again when the study resumes.
STOP = threading.Event()
INTERRUPTED = "interrupted: the study driver was stopped; the trial runs again when the study resumes"


class TrialFailed(Exception):
    """The trainer exited badly or reported nothing: fails this trial only."""


def worker_id():
    return f"{socket.gethostname()}:{os.getpid()}"


def trial_dir(job_dir, number):
    return os.path.join(job_dir, f"trial-{number:04d}")


def trainer_argv(spec, job_dir, params):
    """Flag file first, then the fixed flags, then the trial's: absl lets the last one win."""
    argv = list(spec.trainer_command)
    if spec.flagfile:
        argv.append(f"--flagfile={spec.flagfile}")
    if spec_lib.is_builtin_trainer(spec):
        argv.append(f"--hyperparameter_metric_tag={spec.metric}")  # the metric its metrics file reports
    argv += [f"--{name}={value}" for name, value in spec.trainer_flags]
    argv += [f"--{name}={params_lib.flag_text(value)}" for name, value in params.items()]
    argv.append(f"--job-dir={job_dir}")
    return argv


def _load_libc():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None  # not glibc: a SIGKILLed driver leaves its trainers running


# Loaded here, in the parent: the child (forked while other trials' threads run)
# then makes one foreign call before exec, and takes no loader lock another thread may hold.
_LIBC = _load_libc()


def _die_with_parent():
    # Runs in the child before exec: a SIGKILLed driver takes its trainers with it
    # instead of leaving them training for nobody.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class MetricsReader:
    """Reads complete new lines of a cloudml-hypertune file: [(step, value), ...]."""

    def __init__(self, path, metric):
        self.path, self.metric, self.offset, self.tags = path, metric, 0, set()

    def new_values(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line being written waits for the next read
        self.offset += len(complete)
        values = []
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
                self.tags.update(k for k in record if k not in ("timestamp", "trial", "global_step", "checkpoint_path"))
                if self.metric in record:
                    values.append((int(float(record.get("global_step", len(values)))), float(record[self.metric])))
            except (ValueError, TypeError, AttributeError):
                continue  # not a metrics line; the trainer's own log says what happened
        return values


def run_trial(trial, spec, job_dir, params, poll_seconds):
    """Runs the trainer for trial; returns its value, or raises TrialPruned / TrialFailed."""
    out = trial_dir(job_dir, trial.number)
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, METRICS_FILE)
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    for stale in ("failure", "killed_by_signal", "last_step", "interrupted"):  # a retry inherits its failed twin's attrs
        if trial.user_attrs.get(stale) is not None:
            trial.set_user_attr(stale, None)
    trial.set_user_attr("job_dir", os.path.abspath(out))
    trial.set_user_attr("worker", worker_id())
    env = dict(os.environ, CLOUD_ML_HP_METRIC_FILE=os.path.abspath(metrics_path), CLOUD_ML_TRIAL_ID=str(trial.number))
    reader = MetricsReader(metrics_path, spec.metric)
    reported = []
    with open(os.path.join(out, LOG_FILE), "ab") as log:
        # Its own session: Ctrl-C reaches the driver alone, which stops the trainers itself.
        proc = subprocess.Popen(trainer_argv(spec, out, params), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent if _LIBC else None)
        try:
            finished = False
            while not finished:
                if STOP.is_set():
                    raise KeyboardInterrupt
                finished = _wait(proc, poll_seconds)
                for step, value in reader.new_values():
                    reported.append((step, value))
                    trial.set_user_attr("last_step", step)
                    trial.report(value, step)
                    if trial.should_prune():
                        _stop(proc)
                        raise optuna.TrialPruned(f"pruned at step {step}: {spec.metric}={value:.4f}")
        except BaseException as e:
            _stop(proc)  # pruned, or the driver is interrupted: the trainer goes too
            if isinstance(e, KeyboardInterrupt):
                trial.set_user_attr("interrupted", True)
                trial.set_user_attr("failure", INTERRUPTED)
            raise
    return _result(trial, proc.returncode, reported, reader, spec, out)


def _wait(proc, seconds):
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _stop(proc):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=TERMINATE_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _result(trial, returncode, reported, reader, spec, out):
    if returncode != 0:
        if returncode < 0:
            reason = f"trainer killed by {signal.Signals(-returncode).name}"
            trial.set_user_attr("killed_by_signal", -returncode)
        else:
            reason = f"trainer exited with status {returncode}: {_last_line(os.path.join(out, LOG_FILE))}"
        trial.set_user_attr("failure", reason)
        raise TrialFailed(reason)
    if not reported:
        seen = ", ".join(sorted(reader.tags)) or "nothing"
        reason = f"the trainer reported no {spec.metric!r} values (its metrics file has: {seen})"
        trial.set_user_attr("failure", reason)
        raise TrialFailed(reason)
    values = [value for _, value in reported if not math.isnan(value)]
    if not values:
        reason = f"every {spec.metric!r} value the trainer reported was NaN (did the training diverge?)"
        trial.set_user_attr("failure", reason)
        raise TrialFailed(reason)
    if spec.measurement == "last":
        return values[-1]
    return max(values) if spec.goal == "maximize" else min(values)


def _last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"
