"""Entry point: `python -m trainer.task --flag=value ...` (also the container's).

Defines the trainer's absl flags from the flag table (schema.py), translates
ModelArts' and PAI's parameter names into them (platforms.py), turns them
into a validated Config, picks the Keras backend before Keras is imported, and
hands over to train.run(). User mistakes end here as one `error:` line and
exit status 2.
"""

import gc
import os
import shutil
import sys
import tempfile

from absl import flags

from trainer import cli, config as config_lib, platforms, schema

FLAGS = flags.FlagValues()
cli.define(schema.TRAINER_FLAGS, FLAGS)

PROGRAM = cli.Program(
    usage="python -m trainer.task --training_data_path=... --validation_data_path=... --num_classes=N "
          "(--max_steps=N | --num_epochs=N) --job-dir=DIR [--flag=value ...]",
    summary="Trains an image classifier on your images, evaluates it every --eval_frequency steps, and exports "
            "the best evaluation as a TensorFlow SavedModel that serves encoded image bytes.",
    example="python -m trainer.task --training_data_path=gs://b/train-* --validation_data_path=gs://b/val-* "
            "--num_classes=5 --max_steps=2000 --model_type=resnet-50 --job-dir=runs/run1",
    groups=schema.GROUPS,
    group_notes=schema.GROUP_NOTES,
    notes="The job-dir may also come from $AIP_MODEL_DIR (Vertex AI); the backend from $KERAS_BACKEND. "
          "Rerunning the same command resumes from the job-dir's last checkpoint. Huawei ModelArts' parameter "
          "names (data_url, train_url, checkpoint_url, use_mixup, label_balance, use_sync_bn, ...) and PAI "
          "EasyVision's --pai_param_config are translated into these flags; the translation is printed first. "
          "`--flag value` reads as --flag=value.",
)


def config_from_flags(values, environ=os.environ):
    """Builds and validates the Config from parsed flag values."""
    given = {flag.name: values[flag.name].value for flag in schema.config_flags()}
    if not values["backend"].present:
        given["backend"] = environ.get("KERAS_BACKEND") or None
    return config_lib.from_values(given)


def check_required(values, environ=os.environ):
    """Every missing required flag, the job-dir included, in one error; returns the job-dir."""
    missing = cli.missing_flags(values, schema.TRAINER_FLAGS)
    if values["max_steps"].value is None and not values["num_epochs"].value:
        missing.append("max_steps (or --num_epochs)")
    job_dir = cli.given_job_dir(values, environ)
    cli.require(missing + (["job-dir"] if job_dir is None else []))
    return job_dir


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if not any(arg in cli.HELP_ARGS for arg in argv[1:]):
        try:
            argv, lines = platforms.translate(argv)  # ModelArts' and PAI's names -> ours
        except cli.UserError as e:
            cli.fail(str(e))
        for line in lines:
            cli.say(line)
    cli.parse_command_line(FLAGS, argv, help_of=(PROGRAM, schema.TRAINER_FLAGS))
    try:
        job_dir = check_required(FLAGS)
        config = config_from_flags(FLAGS)
    except cli.UserError as e:
        cli.fail(str(e))
    # Keras reads the backend once, at import: set it before anything imports Keras.
    os.environ["KERAS_BACKEND"] = config.backend
    cli.import_tensorflow_quietly()
    from trainer import train

    # Building and tracing the model make hundreds of thousands of objects that last the whole run:
    # collect the young ones less often, the old ones rarely (0.2 s of CPU in a one-step run).
    gc.set_threshold(10_000, 20, 20)

    # TensorFlow's autograph leaves generated files in the temporary folder until exit hooks
    # run, which the os._exit below skips: give the run a temporary folder of its own.
    outer, tempfile.tempdir = tempfile.tempdir, tempfile.mkdtemp(prefix="trainer-")
    try:
        with train.stop_on_signals():
            train.run(config, job_dir)
    except cli.UserError as e:
        cli.fail(str(e), e.status)
    finally:
        shutil.rmtree(tempfile.tempdir, ignore_errors=True)
        tempfile.tempdir = outer


if __name__ == "__main__":
    try:
        main()
        status = 0
    except SystemExit as e:  # cli.fail: a mistake, or a run stopped by a signal or a diverging loss
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)  # as the interpreter does for sys.exit("text")
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    # Every output is written, flushed and closed by now, also when a signal stopped the
    # run (a study's pruned trial): skip the interpreter's teardown of TensorFlow's
    # objects, which takes about 2 s.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
