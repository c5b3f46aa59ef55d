"""Entry point: `python -m hptuning.study --study_config=... --job-dir=...`.

The only module of hptuning that defines flags. It reads the study config,
checks it against the trainer's own flags, opens (or resumes) the Optuna study
and runs trials until the study has max_trial_count finished ones, counted over
every worker sharing the storage. User mistakes end as one `error:` line and
exit status 2; a study stopped by max_failed_trial_count exits with 1.
"""

import logging
import os
import random
import signal
import sys
import warnings

import optuna
from absl import flags
from optuna.trial import TrialState

from hptuning import algorithms, outputs, runner
from hptuning import params as params_lib
from hptuning import spec as spec_lib
from hptuning import storage as storage_lib
from trainer.config import UserError, fail, parse_command_line

FLAGS = flags.FlagValues()
flags.DEFINE_string("study_config", None, "Study YAML: ours or a Vertex AI tuning job config (studySpec).", flag_values=FLAGS)
flags.DEFINE_string("job-dir", None, "Local folder for trial-NNNN/ job-dirs, trials.csv, best.json, plots/.", flag_values=FLAGS)
flags.DEFINE_string("job_dir", None, "Same as --job-dir.", flag_values=FLAGS)
flags.DEFINE_string("storage", None, "Optuna RDB URL shared by every worker, e.g. postgresql://user:pass@host/db (default: SQLite file study.db in the job-dir, one process only).", flag_values=FLAGS)
flags.DEFINE_string("study_name", None, "Name of the study in the storage (default: the study config's file name without .yaml).", flag_values=FLAGS)
flags.DEFINE_integer("parallel_trial_count", 0, "Trials at once in this process (default: the config's parallel_trial_count).", flag_values=FLAGS)
flags.DEFINE_integer("max_trial_count", 0, "Finished trials the study stops at (default: the config's max_trial_count).", flag_values=FLAGS)
flags.DEFINE_integer("heartbeat_interval", 60, "Seconds between a running trial's heartbeats; a trial silent for twice this long is failed and retried by the other workers.", flag_values=FLAGS)
flags.DEFINE_float("poll_seconds", 1.0, "Seconds between reads of a running trial's metrics file.", flag_values=FLAGS)

RESERVED_FLAGS = ("job-dir", "job_dir", "flagfile")


def trainer_flag_types():
    """{flag: absl type name} for every trainer flag (importing trainer.task is fast: no TensorFlow)."""
    from trainer import task

    return {name: task.FLAGS[name].flag_type() for name in task.flag_names()}


def check_against_trainer(spec):
    known = trainer_flag_types()
    if runner.is_builtin_trainer(spec):
        from trainer.config import TUNABLE_METRICS

        metrics = list(dict.fromkeys(m for task in TUNABLE_METRICS.values() for m in task))
        if spec.metric not in metrics:
            raise UserError(f"metric: the trainer does not report {spec.metric!r}; valid: {', '.join(metrics)}")
        if spec.goal != "maximize":
            raise UserError(f"goal: {spec.metric} is higher-is-better, as every metric the trainer reports; use maximize")
        tag = dict(spec.trainer_flags).get("hyperparameter_metric_tag")
        if tag is not None and tag != spec.metric:
            raise UserError(f"trainer_flags.hyperparameter_metric_tag: {tag} differs from the study's metric "
                            f"{spec.metric}; leave it out (the driver passes the study's metric)")
    params_lib.check_against_flags(spec.parameters, known, RESERVED_FLAGS)
    for name, _ in spec.trainer_flags:
        if name in RESERVED_FLAGS:
            raise UserError(f"trainer_flags.{name}: the study driver sets it (use the flagfile key for a flag file)")
        if name not in known:
            raise UserError(f"trainer_flags.{name}: not a trainer flag; see `python -m trainer.task --helpfull`")


def _job_dir(values):
    dashed, underscored = values["job-dir"].value, values["job_dir"].value
    if dashed and underscored and dashed != underscored:
        raise UserError("--job-dir and --job_dir disagree; give one of them")
    job_dir = dashed or underscored
    if not job_dir:
        raise UserError("--job-dir is required (a local folder for the trials and the study's outputs)")
    if "://" in job_dir:
        raise UserError(f"--job-dir={job_dir}: must be a local folder (trials write their metrics files there)")
    return os.path.abspath(job_dir)


def _finished(study):
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


class Progress:
    """Prints each finished trial and stops the study at its trial or failure limits."""

    def __init__(self, spec):
        self.spec, self.failure = spec, None

    def __call__(self, study, trial):
        metric = self.spec.metric
        if trial.state == TrialState.COMPLETE:
            best = study.best_trial
            runner.say(f"trial {trial.number} complete: {metric}={trial.value:.4f} "
                       f"(best: trial {best.number}, {best.value:.4f})")
        elif trial.state == TrialState.PRUNED:
            runner.say(f"trial {trial.number} pruned at step {trial.user_attrs.get('last_step')}")
        elif trial.state == TrialState.FAIL:
            runner.say(f"trial {trial.number} failed: {trial.user_attrs.get('failure') or 'see its trainer.log'}")
            if trial.user_attrs.get("killed_by_signal"):
                storage_lib.retry_callback()(study, trial)
        if self.over_limits(study):
            study.stop()

    def over_limits(self, study):
        """True once the study has its finished trials, or too many failed ones (then self.failure says so)."""
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


def run_study(spec, job_dir, storage_url, study_name, heartbeat_interval=60, poll_seconds=1.0, callbacks=()):
    """Runs (or resumes) the study; returns the exit status."""
    sampler = algorithms.make_sampler(spec.sampler, spec.parameters)
    pruner = algorithms.make_pruner(spec.early_stopping)
    os.makedirs(job_dir, exist_ok=True)
    lock = storage_lib.lock_sqlite(storage_url)  # held until the process ends
    storage = storage_lib.open_storage(storage_url, heartbeat_interval)
    study = storage_lib.open_study(storage, study_name, spec, sampler, pruner)
    shown = storage_lib.shown(storage_url)
    for number in storage_lib.fail_dead_local_trials(study, storage):
        runner.say(f"trial {number}: its driver process was killed; it runs again as a new trial")
    optuna.storages.fail_stale_trials(study)  # workers on other hosts that stopped beating; retried
    for number in storage_lib.requeue_interrupted(study):
        runner.say(f"trial {number} was interrupted; it runs again as a new trial")
    if "seed" in spec.sampler:
        study.sampler = algorithms.make_sampler(_sampler_seed(spec.sampler, study, lone=lock is not None),
                                                spec.parameters)
    defaults = params_lib.defaults(spec.parameters)
    if defaults and not study.get_trials(deepcopy=False):
        study.enqueue_trial(defaults, skip_if_exists=True)
    progress = Progress(spec)
    runner.say(f"study {study_name!r} ({shown}): {_finished(study)} of {spec.max_trial_count} trials "
               f"finished; running up to {spec.parallel_trial_count} at once; job-dir {job_dir}")

    def objective(trial):
        params = params_lib.suggest(trial, spec.parameters)
        shown_params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        runner.say(f"trial {trial.number} started: {shown_params}")
        return runner.run_trial(trial, spec, job_dir, params, poll_seconds)

    ran = False
    try:
        # Failed trials do not count towards max_trial_count, so one optimize() may not be enough.
        while not progress.over_limits(study):
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))  # on other workers
            remaining = spec.max_trial_count - _finished(study) - running
            ran, before = True, len(study.get_trials(deepcopy=False))
            study.optimize(objective, n_trials=remaining, n_jobs=min(spec.parallel_trial_count, remaining),
                           catch=(runner.TrialFailed,), callbacks=[progress, *callbacks])
            if not any(t.state == TrialState.FAIL for t in study.get_trials(deepcopy=False)[before:]):
                break  # done, or stopped by a callback; only failed trials leave trials to make up
        if not ran and progress.failure is None:
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            runner.say(f"study {study_name!r} already has {_finished(study)} finished trials"
                       f"{f' and {running} running on other workers' if running else ''}; nothing to run here")
    finally:  # interrupted too: the outputs show what finished
        runner.say(outputs.write_all(study, spec, job_dir, shown))
    if progress.failure:
        print(f"error: {progress.failure}", file=sys.stderr, flush=True)
        return 1
    return 0


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


def _check_flags(values):
    for name in ("parallel_trial_count", "max_trial_count"):
        if values[name].value < 0:
            raise UserError(f"--{name}={values[name].value}: expected a positive integer (0 or absent: the config's)")
    if values.heartbeat_interval < 1:
        raise UserError(f"--heartbeat_interval={values.heartbeat_interval}: expected at least 1 second")
    if not values.poll_seconds > 0:
        raise UserError(f"--poll_seconds={values.poll_seconds}: expected a positive number of seconds")


def main(argv=None):
    parse_command_line(FLAGS, argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop_trials)
    quiet_optuna()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        if not FLAGS.study_config:
            raise UserError("--study_config is required (a study YAML, e.g. sample_configs/hptuning/digits.yaml)")
        _check_flags(FLAGS)
        spec = spec_lib.load(FLAGS.study_config)
        check_against_trainer(spec)
        overrides = {k: FLAGS[k].value for k in ("parallel_trial_count", "max_trial_count") if FLAGS[k].value > 0}
        spec = spec_lib.dataclasses.replace(spec, **overrides)
        job_dir = _job_dir(FLAGS)
        name = FLAGS.study_name or os.path.splitext(os.path.basename(FLAGS.study_config))[0]
        code = run_study(spec, job_dir, FLAGS.storage or storage_lib.default_url(job_dir), name,
                         FLAGS.heartbeat_interval, FLAGS.poll_seconds)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume the study (finished trials are kept)")
    sys.exit(code)


if __name__ == "__main__":
    main()
