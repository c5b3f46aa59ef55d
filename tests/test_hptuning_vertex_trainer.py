"""A Vertex AI job's trial spec picks the trainer, as on Vertex: containerSpec's
command, or pythonPackageSpec's pythonModule, with the job's args and env.

The jobs are built with google-cloud-aiplatform's types; the custom trainer
records the argv and environment it got and reports with Google's hypertune
client. Its parameters are named as no trainer flag is: only the built-in
trainer's flags are checked.
"""

import json
import os
import sys

import pytest
import yaml
from google.cloud import aiplatform_v1 as v1
from google.protobuf import json_format

from hptuning import spec as spec_lib
from hptuning import study
from tests.hptuning_helpers import ROOT, driver_env, read_trials, run_driver, study_main
from trainer.cli import UserError

S, P = v1.StudySpec, v1.StudySpec.ParameterSpec


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def write(tmp_path, job, as_yaml=False, **beside):
    """The job as the SDK dumps it: MessageToJson's text, or to_dict's snake_case and integer enums as YAML;
    beside: our keys added to it."""
    path = tmp_path / ("job.yaml" if as_yaml else "job.json")
    if as_yaml:
        path.write_text(yaml.safe_dump({**type(job).to_dict(job), **beside}))
    else:
        path.write_text(json.dumps({**json.loads(json_format.MessageToJson(type(job).pb(job))), **beside}))
    return str(path)


# A custom trainer: records what it was given, reports with Google's own hypertune client.
RECORDER = r'''
import json, os, sys
import hypertune
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
with open(os.path.join(flags["job-dir"], "record.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in ("GREETING", "EMPTY")}}, f)
loss = abs(int(flags["width"]) - 2) + int(flags["batch"]) / 100
hypertune.HyperTune().report_hyperparameter_tuning_metric(hyperparameter_metric_tag="loss", metric_value=loss,
                                                          global_step=1)
'''
CUSTOM_ARGS = ["--greeting", "hello world", "--noverbose", "--job-dir", "gs://bucket/out", "--seed=7"]


def custom_job(**code):
    """Names no trainer flag knows; a metric to minimise; a discrete default the SDK writes as 32.0."""
    study_spec = S(metrics=[S.MetricSpec(metric_id="loss", goal=S.MetricSpec.GoalType.MINIMIZE)],
                   algorithm=S.Algorithm.RANDOM_SEARCH, parameters=[
                       P(parameter_id="width", integer_value_spec=P.IntegerValueSpec(min_value=0, max_value=4,
                                                                                     default_value=3)),
                       P(parameter_id="batch", discrete_value_spec=P.DiscreteValueSpec(values=[16, 32],
                                                                                       default_value=32))])
    env = [v1.EnvVar(name="GREETING", value="hi there"), v1.EnvVar(name="EMPTY", value="")]
    spec_kind = v1.PythonPackageSpec if "python_module" in code else v1.ContainerSpec
    pool = v1.WorkerPoolSpec(**{"python_package_spec" if "python_module" in code else "container_spec":
                                spec_kind(args=CUSTOM_ARGS, env=env, **code)})
    return v1.HyperparameterTuningJob(display_name="custom", study_spec=study_spec, max_trial_count=3,
                                      parallel_trial_count=1, trial_job_spec=v1.CustomJobSpec(worker_pool_specs=[pool]))


def check_records(job_dir):
    trials = read_trials(job_dir)
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3
    for trial in trials:
        with open(os.path.join(trial["job_dir"], "record.json")) as f:
            record = json.load(f)
        assert record["env"] == {"GREETING": "hi there", "EMPTY": ""}
        # The args as written (less the job-dir), then the trial's parameters, then the driver's job-dir.
        assert record["argv"][:4] == ["--greeting", "hello world", "--noverbose", "--seed=7"]
        assert record["argv"][-1] == f"--job-dir={trial['job_dir']}"
        if trial["number"] == "0":  # the defaults
            assert sorted(record["argv"][4:-1]) == ["--batch=32", "--width=3"]
    return trials


def test_a_container_command_runs_the_users_trainer_end_to_end(tmp_path):
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    config = write(tmp_path, custom_job(command=["python", str(recorder)]))
    result = run_driver(config, str(tmp_path / "study"), env=driver_env())
    assert result.returncode == 0, result.stderr
    assert "note: ignoring trialJobSpec's --job-dir gs://bucket/out" in result.stdout
    check_records(str(tmp_path / "study"))


def test_a_python_module_runs_with_the_jobs_environment(tmp_path, capsys):
    (tmp_path / "recorder_module.py").write_text(RECORDER)
    job = custom_job(python_module="recorder_module", executor_image_uri="python:3.11",
                     package_uris=["gs://bucket/recorder.tar.gz"])
    job.trial_job_spec.worker_pool_specs[0].python_package_spec.env.append(
        v1.EnvVar(name="PYTHONPATH", value=str(tmp_path)))  # where the job's package is "installed"
    config = write(tmp_path, job, as_yaml=True)
    result = study_main(capsys, f"--study_config={config}", f"--job-dir={tmp_path / 'study'}", "--poll_seconds=0.05")
    assert result.returncode == 0, result.stderr
    trials = check_records(str(tmp_path / "study"))
    assert min(float(t["value"]) for t in trials) <= 1.32  # the defaults' loss: |3 - 2| + 32 / 100


def test_the_trial_job_picks_the_trainer(tmp_path):
    def load(**code):
        return spec_lib.load(write(tmp_path, custom_job(**code), as_yaml=True))

    container = load(command=["python", "my_trainer.py"])
    assert container.trainer_command == (sys.executable, "my_trainer.py", *CUSTOM_ARGS[:3], "--seed=7")
    study.check_against_trainer(container)  # any parameter names, any metric, either goal
    assert load(python_module="my_pkg.train").trainer_command[:3] == (sys.executable, "-m", "my_pkg.train")
    builtin = load(python_module="trainer.task")  # the built-in trainer: its args are flags, checked as such
    assert spec_lib.is_builtin_trainer(builtin) and dict(builtin.trainer_flags)["greeting"] == "hello world"
    with pytest.raises(UserError, match="metric: the trainer does not report 'loss'"):
        study.check_against_trainer(builtin)
    with pytest.raises(UserError, match="give trialJobSpec's command .* or trainer_command, not both"):
        spec_lib.load(write(tmp_path, custom_job(command=["python", "t.py"]), trainer_command="python t.py"))
