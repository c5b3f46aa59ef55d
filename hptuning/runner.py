"""One trial: the trainer as its own process, in its own job-dir, with its own
hypertune metrics file that the driver reads as evaluations land.

Each evaluation goes to Optuna as an intermediate value at the trainer's
global_step (a report without one takes the step after the last); when the
pruner says stop, the process is terminated. The trial's value is its best
evaluation (or its last, with measurement: last). A built-in trial whose flags
the trainer's own checks refuse fails without starting; a trainer that exits
badly fails its trial; one that exits with a user mistake every trial would
repeat (status 2 and an `error:` line) marks the trial so the driver stops
the study.
"""

import collections
import ctypes
import json
import math
import os
import re
import signal
import socket
import subprocess
import threading
import time

import optuna

from hptuning import params as params_lib
from hptuning import spec as spec_lib

METRICS_FILE = "hypertune.metrics"
SCAN_CACHE = "scan-cache"  # in the study's job-dir: the trainer's --scan_cache_dir
LOG_FILE = "trainer.log"
TERMINATE_GRACE_SECONDS = 30  # SIGTERM first, SIGKILL if the trainer has not exited by then
_PR_SET_PDEATHSIG = 1
# Set when the driver is told to stop (Ctrl-C, SIGTERM): every running trial stops its
# trainer and is marked interrupted, to run again when the study resumes.
STOP = threading.Event()
INTERRUPTED = "interrupted: the study driver was stopped; the trial runs again when the study resumes"
# Set when another trial met a user error every trial would repeat: the trials running beside it
# stop their trainers too, and run again when the study resumes.
ABANDON = threading.Event()
ABANDONED = "stopped: another trial met a user error; the trial runs again when the study resumes"


# Set on a trial whose trainer exited with a user mistake every trial shares (status 2, its `error:` line):
# the study stops at once with that line, and the trial's parameters run again when the study resumes.
USER_ERROR = "user_error"
NOT_FOR_TRIALS = ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR", "TF_CONFIG", "CLUSTER_SPEC")
USER_ERROR_STATUS = 2  # trainer.cli.fail's exit status for a user mistake


class TrialFailed(Exception):
    """The trainer exited badly or reported nothing: fails this trial only."""


def worker_id():
    return f"{socket.gethostname()}:{os.getpid()}"


def trial_dir(job_dir, number):
    return os.path.join(job_dir, f"trial-{number:04d}")


def trainer_argv(spec, job_dir, params):
    """Flag file first, then the fixed flags, then the trial's: absl lets the last one win.

    job_dir: the trial's own folder, inside the study's.
    """
    argv = list(spec.trainer_command)
    if spec.flagfile:
        argv.append(f"--flagfile={spec.flagfile}")
    if spec_lib.is_builtin_trainer(spec):
        argv.append(f"--hyperparameter_metric_tag={spec.metric}")  # the metric its metrics file reports
        # One scan of the data for the whole study: the first trial's, kept in the study's folder.
        argv.append(f"--scan_cache_dir={os.path.join(os.path.dirname(job_dir.rstrip('/')), SCAN_CACHE)}")
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
    """Reads a cloudml-hypertune metrics file as it is written: [(step, value), ...] of the reports not read yet.

    The hypertune library keeps its last 100 reports and rewrites the whole file
    on each one (truncate, then write); trainer.task appends a line. A file that
    only grew since the last read (what was read is still there, unchanged) is
    read from where that read stopped; any other change (rewritten, rotated,
    replaced, caught half-written) is read whole, and the reports already read
    (the same line) are dropped. A line not ended yet waits for the next read.
    The library writes global_step "0" when it is given none: such reports, and
    lines without the key, get the step after the last one seen, so each lands
    on a step of its own.
    """

    def __init__(self, path, metric):
        self.path, self.metric, self.tags = path, metric, set()
        self.seen = set()  # every line read, to drop the ones a rewritten file repeats
        self.offset, self.head, self.tail = 0, b"", b""  # where the last read stopped; the first and last line before it
        self.last_step = 0

    def new_values(self):
        try:
            with open(self.path, "rb") as f:
                start = self.offset if self._only_grew(f) else 0
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        if start == 0:
            self.head = complete[: complete.find(b"\n") + 1]
        if complete:
            self.tail = complete[complete.rfind(b"\n", 0, len(complete) - 1) + 1:]
        self.offset = start + len(complete)
        # What an earlier read returned is not new, whatever this read's start: a rewrite caught
        # half written can look like a file that only grew. Every report carries its timestamp.
        lines = [line.strip() for line in complete.splitlines() if line.strip()]
        lines = [line for line in lines if line not in self.seen]
        self.seen.update(lines)
        return [value for value in map(self._parse, lines) if value is not None]

    def _only_grew(self, f):
        if not self.offset or os.fstat(f.fileno()).st_size < self.offset:
            return False
        if f.read(len(self.head)) != self.head:
            return False
        f.seek(self.offset - len(self.tail))
        return f.read(len(self.tail)) == self.tail

    def _parse(self, line):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                return None
            self.tags.update(k for k in record if k not in ("timestamp", "trial", "global_step", "checkpoint_path"))
            if self.metric not in record:
                return None
            value = float(record[self.metric])
            step = int(float(record.get("global_step") or 0))
        except (ValueError, TypeError, OverflowError):
            return None  # not a metrics line; the trainer's own log says what happened
        if step <= 0:
            step = self.last_step + 1
        self.last_step = max(self.last_step, step)
        return step, value


def run_trial(trial, spec, job_dir, params, poll_seconds):
    """Runs the trainer for trial; returns its value, or raises TrialPruned / TrialFailed."""
    out = trial_dir(job_dir, trial.number)
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, METRICS_FILE)
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    for stale in ("failure", "killed_by_signal", "last_step", "interrupted", USER_ERROR):  # a retry inherits its twin's
        if trial.user_attrs.get(stale) is not None:
            trial.set_user_attr(stale, None)
    trial.set_user_attr("job_dir", os.path.abspath(out))
    trial.set_user_attr("worker", worker_id())
    # The study's container env (a Vertex trial job spec's), then the two variables the driver owns.
    # Output folders and a cluster named by the environment belong to the driver's own job, not to
    # a trial: with them every trial would write (and resume) one model and checkpoint folder.
    env = {k: v for k, v in dict(os.environ, **dict(spec.trainer_env)).items() if k not in NOT_FOR_TRIALS}
    env.update(CLOUD_ML_HP_METRIC_FILE=os.path.abspath(metrics_path), CLOUD_ML_TRIAL_ID=str(trial.number))
    argv = trainer_argv(spec, out, params)
    if spec_lib.is_builtin_trainer(spec):
        problem = _builtin_config_problem(argv[3:], env)
        if problem:  # this trial's combination of values, not the study: it fails alone, with no start-up
            trial.set_user_attr("failure", f"error: {problem}")
            raise TrialFailed(f"error: {problem}")
    reader = MetricsReader(metrics_path, spec.metric)
    reported, steps = [], set()
    with open(os.path.join(out, LOG_FILE), "ab") as log:
        # Its own session: Ctrl-C reaches the driver alone, which stops the trainers itself.
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent if _LIBC else None)
        started = time.monotonic()
        try:
            finished = False
            while not finished:
                if spec.trial_timeout and time.monotonic() - started > spec.trial_timeout:
                    _stop(proc)  # SIGTERM: a built-in trainer saves a checkpoint first; SIGKILL after the grace
                    reason = f"stopped after {spec.trial_timeout:g} s: longer than trial_timeout"
                    trial.set_user_attr("failure", reason)
                    raise TrialFailed(reason)
                if STOP.is_set():
                    raise KeyboardInterrupt
                if ABANDON.is_set():
                    _stop(proc)
                    trial.set_user_attr("interrupted", True)
                    trial.set_user_attr("failure", ABANDONED)
                    raise TrialFailed(ABANDONED)
                finished = _wait(proc, poll_seconds)
                pending = collections.deque(reader.new_values())
                while pending:
                    step, value = pending.popleft()
                    # Optuna's storage may take longer than the trainer between two reports: read the
                    # file again after each one, before the library's 100-line window moves past a report.
                    pending.extend(reader.new_values())
                    reported.append((step, value))
                    if step in steps:
                        continue  # Optuna keeps a step's first value (a restarted trainer may evaluate a step again)
                    steps.add(step)
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
    return _result(trial, proc.returncode, reported, reader, spec, out, params)


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


def _builtin_config_problem(args, env):
    """The built-in trainer's own check of a trial's flags (no TensorFlow, no process): its error, or None."""
    from absl import flags

    from trainer import cli, schema, task

    values = flags.FlagValues()  # one per trial: parallel trials check at once
    cli.define(schema.TRAINER_FLAGS, values)
    try:
        values(["trainer.task", *args])
        task.check_required(values, env)
        task.config_from_flags(values, env)
    except (flags.Error, cli.UserError) as e:
        return str(e).replace("\n", " ")
    return None


def _result(trial, returncode, reported, reader, spec, out, params):
    if returncode != 0:
        if returncode < 0:
            reason = f"trainer killed by {signal.Signals(-returncode).name}"
            trial.set_user_attr("killed_by_signal", -returncode)
        else:
            lines = _last_lines(os.path.join(out, LOG_FILE))
            error = next((line for line in reversed(lines) if line.startswith("error:")), None)
            reason = f"trainer exited with status {returncode}: {error or (lines[-1] if lines else '(empty log)')}"
            if returncode == USER_ERROR_STATUS and error and not _names_a_parameter(error, params):
                trial.set_user_attr(USER_ERROR, error)
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


def _names_a_parameter(error, params):
    """Whether the trainer's error names (as --flag) a flag this trial tunes: then it is this configuration's alone."""
    return any(re.search(rf"--{re.escape(name)}\b", error) for name in params)


def _last_lines(path):
    """The last non-empty lines of the trainer's log (its last 4 KiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            return [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ["(no log)"]
