"""The image's entrypoint: `python -m trainer.container train | serve | --flag=value ...`.

One image, three roles, chosen by the first argument as each platform starts a container:
  train         SageMaker training: hyperparameters.json and the channels become the trainer's flags and
                variables (sagemaker.py), printed as one command, and the trainer runs in this process. On any
                failure the `error:` line (or an unexpected exception's last line) goes to output/failure too,
                and the exit status is non-zero.
  serve         prediction (trainer.serve) on 0.0.0.0: SageMaker hosting's /ping and /invocations on port 8080
                with the model from /opt/ml/model (its highest numbered version), or Vertex AI's
                AIP_HTTP_PORT, AIP_STORAGE_URI and routes when set; TF Serving's REST routes beside them.
  --flag=value  exactly `python -m trainer.task`: Vertex AI custom jobs, local runs.
Flags after `train` or `serve` are passed on (after the hyperparameters: they win).
"""

import os
import sys
import traceback

from trainer import cli, sagemaker

ROLES = ("train", "serve")
CONTAINER_HOST = "0.0.0.0"  # a container is reached from outside it; a local `trainer.serve` stays on 127.0.0.1


def main(argv=None, environ=os.environ):
    argv = list(sys.argv if argv is None else argv)
    role = argv[1] if len(argv) > 1 and argv[1] in ROLES else None
    rest = argv[2:] if role else argv[1:]
    if role == "serve":
        from trainer.serving import serve

        serve.main(["trainer.serve", *rest], defaults={"host": CONTAINER_HOST, **sagemaker.serving_defaults(environ)})
    elif role == "train":
        train(rest, environ)
    else:
        from trainer import task

        task.main(["trainer.task", *rest])


def train(extra_flags, environ=os.environ):
    """Runs the SageMaker training job under $SAGEMAKER_BASE_DIR (default /opt/ml) in this process."""
    base = sagemaker.base_dir(environ)
    failure = sagemaker.failure_file(base)
    if os.path.exists(failure):
        os.remove(failure)  # an earlier attempt's: this one decides
    errors = sys.stderr = _ErrorLines(sys.stderr)
    try:
        try:
            job = sagemaker.training_job(base, environ)
        except cli.UserError as e:
            cli.fail(str(e))
        environ.update(job.environ)
        cli.say(f"SageMaker training job in {base}: {job.command()}")
        from trainer import task

        task.main(["trainer.task", *job.flags, *extra_flags])
    except SystemExit as e:
        if e.code not in (None, 0):
            _write_failure(failure, errors.last or f"exit status {e.code}")
        raise
    except BaseException as e:  # noqa: BLE001 - SageMaker must learn why whatever went wrong
        traceback.print_exc()
        _write_failure(failure, _last_line(e))
        sys.exit(1)
    finally:
        sys.stderr = errors.stream


class _ErrorLines:
    """sys.stderr as it was, remembering the last `error:` line written through it (cli.fail's)."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text):
        for line in text.splitlines():
            if line.startswith("error: "):
                self.last = line
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _last_line(error):
    """An exception's last line, as a traceback ends: `Type: message` (of a long message, its last line)."""
    last = "".join(traceback.format_exception_only(error)).strip().splitlines()[-1].strip()
    name = type(error).__name__
    return last if last.startswith(name) else f"{name}: {last}"


def _write_failure(path, line):
    """SageMaker shows this file's text as the job's FailureReason."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(line + "\n")
    except OSError as e:
        print(f"cannot write {path}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
    # As trainer.task: every output is written and flushed; skip the slow teardown of TensorFlow's objects.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
