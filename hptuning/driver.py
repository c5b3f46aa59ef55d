"""The study loop behind `python -m hptuning.study`, once its flags and config are known good.

Opens (or resumes) the Optuna study in its storage, fails and requeues the
trials a killed or stopped driver left running, and runs trials until the
study has max_trial_count finished ones, counted over every worker sharing
the storage (a failed trial is made up by another), or too many failed, or a
trainer met a user error every trial would repeat; then writes the study's
outputs. Optuna is imported here, not in
study.py, so a mistake in the flags is reported before it loads.
"""

import logging
import os
import random
import signal
import sys
import warnings

import optuna
from optuna.trial import TrialState

from hptuning import algorithms, outputs, runner
from hptuning import params as params_lib
from hptuning import storage as storage_lib
from trainer.cli import UserError, say


def _finished(study):
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


class Progress:
    """Prints each finished trial and stops the study at its trial or failure limits, or at a user error."""

    def __init__(self, spec):
        self.spec, self.failure, self.user_error = spec, None, None

    def __call__(self, study, trial):
        metric = self.spec.metric
        if trial.state == TrialState.COMPLETE:
            best = study.best_trial
            say(f"trial {trial.number} complete: {metric}={trial.value:.4f} "
                f"(best: trial {best.number}, {best.value:.4f})")
        elif trial.state == TrialState.PRUNED:
            say(f"trial {trial.number} pruned at step {trial.user_attrs.get('last_step')}")
        elif trial.state == TrialState.FAIL:
            say(f"trial {trial.number} failed: {trial.user_attrs.get('failure') or 'see its trainer.log'}")
            if trial.user_attrs.get("killed_by_signal"):
                storage_lib.retry_callback()(study, trial)
            error = trial.user_attrs.get(runner.USER_ERROR)
            if error and self.user_error is None:
                runner.ABANDON.set()  # the trials running beside it stop now, not when they finish
                self.user_error = (f"{error.removeprefix('error:').strip()} (trial {trial.number}'s trainer; every "
                                   f"trial would repeat it, so the study stopped: fix it and run the same command "
                                   f"again)")
        if self.over_limits(study):
            study.stop()

    def over_limits(self, study):
        """True once the study has its finished trials, or too many failed ones (then self.failure says so),
        or a trial here met a user error."""
        if self.user_error:
            return True
        trials = study.get_trials(deepcopy=False)
        failed = outputs.unretried_failures(trials)
        if len(failed) >= self.spec.max_failed_trial_count:
            last = failed[-1]
            self.failure = (f"study stopped: {len(failed)} trials failed (max_failed_trial_count: "
                            f"{self.spec.max_failed_trial_count}); the last, trial {last.number}: "
                            f"{last.user_attrs.get('failure') or 'its worker was killed'}")
            return True
        # Trials running here or on other workers count too: together they must not pass max_trial_count.
        started = outputs.count(trials, TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        return started >= self.spec.max_trial_count


def _sampler_seed(settings, study, lone):
    """The config's seed for a new study in one process (reproducible), a seed derived from it otherwise.

    A sampler rebuilt with the same seed replays the same random draws, so a
    resumed study, or a second worker, would rerun the configurations already tried.
    """
    trials = len(study.get_trials(deepcopy=False))
    if lone and not trials:
        return settings
    worker = "" if lone else runner.worker_id()
    return {**settings, "seed": random.Random(f"{settings['seed']}:{trials}:{worker}").randrange(2**31)}


def run_study(spec, job_dir, storage_url, study_name, heartbeat_interval=60, poll_seconds=0.25, callbacks=()):
    """Runs (or resumes) the study; returns None, or why it failed (max_failed_trial_count, no trial complete).

    Raises UserError with the trainer's own `error:` line when a trial met a
    mistake every trial would repeat (a data path that does not exist).
    """
    runner.ABANDON.clear()
    sampler = algorithms.make_sampler(spec.sampler, spec.parameters)
    pruner = algorithms.make_pruner(spec.early_stopping)
    os.makedirs(job_dir, exist_ok=True)
    lock = storage_lib.lock_sqlite(storage_url)  # held until the process ends
    storage = storage_lib.open_storage(storage_url, heartbeat_interval)
    study = storage_lib.open_study(storage, study_name, spec, sampler, pruner)
    shown = storage_lib.shown(storage_url)
    for number in storage_lib.fail_dead_local_trials(study, storage):
        say(f"trial {number}: its driver process was killed; it runs again as a new trial")
    optuna.storages.fail_stale_trials(study)  # workers on other hosts that stopped beating; retried
    for number, why in storage_lib.requeue_stopped(study):
        say(f"trial {number} {why}; it runs again as a new trial")
    if "seed" in spec.sampler:
        study.sampler = algorithms.make_sampler(_sampler_seed(spec.sampler, study, lone=lock is not None),
                                                spec.parameters)
    defaults = params_lib.defaults(spec.parameters)
    if defaults and not study.get_trials(deepcopy=False):
        study.enqueue_trial(defaults, skip_if_exists=True)
    progress = Progress(spec)
    say(f"study {study_name!r} ({shown}): {_finished(study)} of {spec.max_trial_count} trials "
        f"finished; running up to {spec.parallel_trial_count} at once; job-dir {job_dir}")

    def objective(trial):
        params = params_lib.suggest(trial, spec.parameters)
        shown_params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        say(f"trial {trial.number} started: {shown_params}")
        return runner.run_trial(trial, spec, job_dir, params, poll_seconds)

    ran = False
    try:
        # Failed trials do not count towards max_trial_count: optimize() again until the finished ones do.
        while not progress.over_limits(study):
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))  # on other workers
            remaining = spec.max_trial_count - _finished(study) - running
            ran, failed = True, _failed(study)
            study.optimize(objective, n_trials=remaining, n_jobs=min(spec.parallel_trial_count, remaining),
                           catch=(runner.TrialFailed,), callbacks=[progress, *callbacks])
            if _failed(study) == failed:
                break  # done, or stopped by a callback; only failed trials (here or elsewhere) leave some to make up
        if not ran and progress.failure is None:
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            say(f"study {study_name!r} already has {_finished(study)} finished trials"
                f"{f' and {running} running on other workers' if running else ''}; nothing to run here")
    finally:  # interrupted too: the outputs show what finished
        say(outputs.write_all(study, spec, job_dir, shown))
    if progress.user_error:
        raise UserError(progress.user_error)
    return progress.failure or _nothing_complete(study, job_dir)


def _failed(study):
    # A count, not the trials after a position: the defaults' trial is queued before optimize() starts.
    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


def _nothing_complete(study, job_dir):
    """A study that ends here with no complete trial (and none running elsewhere) has no answer: a failure."""
    trials = study.get_trials(deepcopy=False)
    if outputs.count(trials, TrialState.COMPLETE, TrialState.RUNNING):
        return None
    return (f"the study has no complete trial ({outputs.count(trials, TrialState.PRUNED)} pruned, "
            f"{outputs.count(trials, TrialState.FAIL)} failed); see {job_dir}/trial-*/trainer.log")


def quiet_optuna():
    """Optuna's own lines minus the per-trial ones (the driver prints those, without tracebacks)."""
    optuna.logging.disable_default_handler()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(lambda record: not record.getMessage().startswith("Trial "))
    handler.setFormatter(_NoTraceback())
    optuna.logging.get_logger("optuna").addHandler(handler)


class _NoTraceback(logging.Formatter):
    def format(self, record):
        return f"optuna {record.levelname.lower()}: {record.getMessage()}"


def _stop_trials(signum, frame):
    """Ctrl-C or SIGTERM: every running trial stops its trainer, and the study can resume later."""
    runner.STOP.set()
    raise KeyboardInterrupt


def run(spec, job_dir, storage_url, study_name, heartbeat_interval, poll_seconds):
    """run_study() as the command runs it: Ctrl-C and SIGTERM stop the trials, Optuna's chatter trimmed.

    storage_url: None means the SQLite file study.db in the job-dir.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop_trials)
    quiet_optuna()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return run_study(spec, job_dir, storage_url or storage_lib.default_url(job_dir), study_name,
                     heartbeat_interval, poll_seconds)
