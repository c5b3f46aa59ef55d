"""Entry point: `python -m hptuning.study --study_config=... --job-dir=...`.

The only module of hptuning that defines flags (STUDY_FLAGS, one table, as
the trainer's). It checks the flags, reads the study config and, when the
trials run the built-in trainer, checks it against that trainer's flag table
(trainer/schema.py) and metrics, all before Optuna is imported; then
driver.py runs the study. User mistakes (in the flags, the study config, or
a trainer's own `error:` line, which every trial would repeat) end as one
`error:` line and exit status 2; a study stopped by max_failed_trial_count,
or that ends with no complete trial, exits with 1.
"""

import dataclasses
import os

from absl import flags

from hptuning import params as params_lib
from hptuning import spec as spec_lib
from trainer import cli, schema, tasks

_JOB_DIR, _JOB_DIR_ALIAS = cli.JOB_DIR_FLAGS
STUDY_FLAGS = (
    cli.Flag("study_config", "string", None, "Study config, YAML or JSON: ours, or a Vertex AI tuning job or StudySpec "
             "as its SDK or console writes it; see docs/HPTUNING.md.", "study", required=True),
    cli.Flag("study_name", "string", None, "Name of the study in the storage; when not given, the study config's "
             "file name without its extension.", "study"),
    cli.Flag("max_trial_count", "integer", 0, "Finished trials the study stops at; 0 takes the config's. Raise it "
             "to extend a finished study.", "study"),
    cli.Flag("parallel_trial_count", "integer", 0, "Trials at once in this process; 0 takes the config's.",
             "study"),
    dataclasses.replace(_JOB_DIR, required=True, help="Local folder for the trials' job-dirs (trial-NNNN/), "
                        "trials.csv, best.json and plots/."),
    _JOB_DIR_ALIAS,
    cli.Flag("storage", "string", None, "Optuna RDB URL shared by every worker, e.g. "
             "postgresql://user:pass@host/db; when not given, the SQLite file study.db in the job-dir, for one "
             "process only.", "storage and workers"),
    cli.Flag("heartbeat_interval", "integer", 60, "Seconds between a running trial's heartbeats; a trial silent "
             "for twice this long is failed and retried by the other workers.", "storage and workers"),
    cli.Flag("poll_seconds", "float", 0.25, "Seconds between reads of a running trial's metrics file: a trial "
             "the pruner stops trains on for up to this long after the evaluation it is judged on.",
             "storage and workers"),
)
FLAGS = flags.FlagValues()
cli.define(STUDY_FLAGS, FLAGS)

PROGRAM = cli.Program(
    usage="python -m hptuning.study --study_config=FILE --job-dir=DIR [--flag=value ...]",
    summary="Tunes a trainer's flags with an Optuna study: each trial is one run of the trainer (`python -m "
            "trainer.task` unless the config names another) in its own job-dir, poor trials stop early, and the "
            "best trial's model is the answer.",
    example="python -m hptuning.study --study_config=sample_configs/hptuning/digits.yaml "
            "--job-dir=runs/digits-sweep",
    groups=("study", "outputs", "storage and workers"),
    notes="Running the same command again resumes the study; workers on several machines share one study "
          "through the same --storage and --study_name. Exit status: 0 when the study has its trials, 1 when "
          "max_failed_trial_count stopped it or no trial completed, 2 for a mistake in the flags or the study "
          "config, or a trainer's own error line (a mistake every trial would repeat).",
)

# Flags the driver gives every trial itself.
RESERVED_FLAGS = (*(flag.name for flag in cli.JOB_DIR_FLAGS), "flagfile")


def check_against_trainer(spec):
    """With the built-in trainer: the config's parameters and fixed flags against its flag table (each
    parameter a flag the table marks tunable), and its metric and goal.

    Another trainer_command takes any flag names and reports any metric; only the flags the driver sets
    itself are refused.
    """
    builtin = spec_lib.is_builtin_trainer(spec)
    known = schema.flag_types() if builtin else None
    if builtin:
        metrics = tasks.all_metrics()
        if spec.metric not in metrics:
            raise cli.UserError(f"metric: the trainer does not report {spec.metric!r}; valid: {', '.join(metrics)}")
        if spec.goal != "maximize":
            raise cli.UserError(f"goal: {spec.metric} is higher-is-better, as every metric the trainer reports; "
                                f"use maximize")
        tag = dict(spec.trainer_flags).get("hyperparameter_metric_tag")
        if tag is not None and tag != spec.metric:
            raise cli.UserError(f"trainer_flags.hyperparameter_metric_tag: {tag} differs from the study's metric "
                                f"{spec.metric}; leave it out (the driver passes the study's metric)")
    params_lib.check_against_flags(spec.parameters, RESERVED_FLAGS, known, schema.tunable() if builtin else None)
    for name, _ in spec.trainer_flags:
        if name in RESERVED_FLAGS:
            raise cli.UserError(f"trainer_flags.{name}: the study driver sets it (use the flagfile key for a flag "
                                f"file)")
        if builtin and name not in known:
            raise cli.UserError(f"trainer_flags.{name}: not a trainer flag; see `python -m trainer.task --help`")


def _missing(values):
    """The required flags not given; the job-dir counts as given under either spelling.

    Not from $AIP_MODEL_DIR, as the trainer takes it: that names one trial's model, not a study's folder.
    """
    missing = [name for name in cli.missing_flags(values, STUDY_FLAGS) if name != _JOB_DIR.name]
    if cli.given_job_dir(values, environ={}) is None:
        missing.append(_JOB_DIR.name)
    return missing


def _job_dir(values):
    job_dir = cli.given_job_dir(values, environ={})
    if "://" in job_dir:
        raise cli.UserError(f"--job-dir={job_dir}: must be a local folder (trials write their metrics files there)")
    return os.path.abspath(job_dir)


def _check_flags(values):
    for name in ("parallel_trial_count", "max_trial_count"):
        if values[name].value < 0:
            raise cli.UserError(f"--{name}={values[name].value}: expected a positive integer (0 or absent: the "
                                f"config's)")
    if values.heartbeat_interval < 1:
        raise cli.UserError(f"--heartbeat_interval={values.heartbeat_interval}: expected at least 1 second")
    if not values.poll_seconds > 0:
        raise cli.UserError(f"--poll_seconds={values.poll_seconds}: expected a positive number of seconds")


def main(argv=None):
    cli.parse_command_line(FLAGS, argv, help_of=(PROGRAM, STUDY_FLAGS))
    try:
        cli.require(_missing(FLAGS))
        _check_flags(FLAGS)
        job_dir = _job_dir(FLAGS)
        spec = spec_lib.load(FLAGS.study_config)
        check_against_trainer(spec)
        overrides = {k: FLAGS[k].value for k in ("parallel_trial_count", "max_trial_count") if FLAGS[k].value > 0}
        spec = dataclasses.replace(spec, **overrides)
        name = FLAGS.study_name or os.path.splitext(os.path.basename(FLAGS.study_config))[0]
        # Optuna loads only now, once the flags and the study config are known good.
        from hptuning import driver

        failure = driver.run(spec, job_dir, FLAGS.storage, name, FLAGS.heartbeat_interval, FLAGS.poll_seconds)
    except cli.UserError as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        cli.fail("interrupted; run the same command again to resume the study (finished trials are kept)")
    if failure:
        cli.fail(failure, status=1)


if __name__ == "__main__":
    main()
