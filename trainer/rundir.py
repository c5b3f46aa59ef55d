"""Where a run writes: every output path of a job-dir, in one place.

    JOB_DIR/model/          the SavedModel of the best evaluation   ($AIP_MODEL_DIR when set)
    JOB_DIR/checkpoints/    what a resume needs (checkpoints.py)    ($AIP_CHECKPOINT_DIR)
    JOB_DIR/logs/           TensorBoard                             ($AIP_TENSORBOARD_LOG_DIR)
    JOB_DIR/config.json     the resolved flags
    JOB_DIR/metrics.json    every evaluation and the best
    JOB_DIR/labels.txt      class names in label order
    JOB_DIR/lease.json      the running trainer's lease (lock.py): one trainer per job-dir
    the hypertune metrics file: $CLOUD_ML_HP_METRIC_FILE, else /tmp/hypertune/output.metrics,
                            started afresh by each run

Vertex AI's AIP_* variables win where set; a SageMaker job sets them to its
own layout (trainer/sagemaker.py: model/1, checkpoints/, the job-dir
output/data/), so nothing here knows the platform. Only the chief of several
processes writes the job-dir; the others write their checkpoints and
metrics.json into a scratch folder of their own (saving weights is a
collective step, so every process saves), and read the chief's checkpoints
to resume. The chief holds the job-dir's lease from open_run_dir to
close_run_dir, so a second trainer on the same job-dir refuses to start; it
also removes what a killed run left half written (model.tmp-PID/).
"""

import dataclasses
import os
import shutil
import tempfile

from trainer import files, lock
from trainer.cli import UserError


@dataclasses.dataclass(frozen=True)
class RunDir:
    job_dir: str  # the user's --job-dir
    root: str  # where this process writes config.json, metrics.json, labels.txt
    model: str
    checkpoints: str  # the chief's checkpoints: every process resumes from them
    own_checkpoints: str  # where this process writes its checkpoints
    logs: str
    is_chief: bool
    hypertune_file: str  # one JSON line per evaluation, for Vertex AI's tuning service and hptuning.study
    lease: object = dataclasses.field(default=None, compare=False)  # the chief's lock.Lease, held until close_run_dir

    def file(self, name):
        return os.path.join(self.root, name)


HYPERTUNE_FILE_DEFAULT = "/tmp/hypertune/output.metrics"  # where cloudml-hypertune writes when no platform names one


def open_run_dir(job_dir, is_chief, worker_index=0, environ=os.environ):
    """The chief's RunDir (checked writable, its lease taken: UserError naming the trainer that holds it), or
    a worker's, writing to a fresh scratch folder."""
    checkpoints = environ.get("AIP_CHECKPOINT_DIR") or os.path.join(job_dir, "checkpoints")
    if not is_chief:
        scratch = tempfile.mkdtemp(prefix=f"worker{worker_index}-")
        return RunDir(job_dir, scratch, os.path.join(scratch, "model"), checkpoints,
                      os.path.join(scratch, "checkpoints"), os.path.join(scratch, "logs"), False,
                      os.path.join(scratch, "hypertune.metrics"))
    run_dir = RunDir(job_dir, job_dir, environ.get("AIP_MODEL_DIR") or os.path.join(job_dir, "model"), checkpoints,
                     checkpoints, environ.get("AIP_TENSORBOARD_LOG_DIR") or os.path.join(job_dir, "logs"), True,
                     environ.get("CLOUD_ML_HP_METRIC_FILE", HYPERTUNE_FILE_DEFAULT))
    for folder, flag in ((job_dir, "--job-dir"), (checkpoints, "the checkpoints folder"), (run_dir.logs, "the logs folder")):
        _check_writable(folder, flag)
    lease = lock.Lease(os.path.join(job_dir, lock.NAME))
    lease.acquire(f"--job-dir={job_dir}")
    try:
        if "CLOUD_ML_HP_METRIC_FILE" not in environ:
            # No platform reads this run's lines from a file it named: start the default one afresh, as
            # the hypertune library does, rather than append to every earlier run's lines.
            files.remove(run_dir.hypertune_file)
        for target in (run_dir.model, run_dir.file("report")):  # a killed export's half-written folders
            files.remove_litter(target)
    except BaseException:
        lease.release()
        raise
    return dataclasses.replace(run_dir, lease=lease)


def _check_writable(folder, flag):
    probe = os.path.join(folder, ".write_test")
    try:
        files.makedirs(folder)
        files.write_atomic(probe, "ok")
        files.remove(probe)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot write"
        raise UserError(f"{flag}: cannot write to {folder} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def close_run_dir(run_dir):
    """Releases the chief's lease; removes a worker's scratch folder (its copies of the chief's files)."""
    if run_dir.lease is not None:
        run_dir.lease.release()
    if not run_dir.is_chief:
        shutil.rmtree(run_dir.root, ignore_errors=True)
