"""The trial's contract with its trainer process, with Google's real
cloudml-hypertune library as the writer: the library keeps its last 100
reports and rewrites the whole file on each one, and writes global_step "0"
when it is given none. The driver must lose no report, count none twice, and
give each its own step; and the trainer gets the study's container env.
"""

import dataclasses
import os
import sys
import textwrap

import hypertune
import optuna
import pytest

from hptuning import runner
from hptuning import spec as spec_lib
from tests.hptuning_helpers import driver_env, read_trials, run_driver, write_config

REPORTS = 150  # past the library's 100, so the file is rotated 50 times
BEST_STEP = 120  # the best value comes after the rotation starts

REPORTING_TRAINER = f'''
import os, sys, time
import hypertune
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
with_step = os.environ["REPORT_GLOBAL_STEP"] == "1"
tuner = hypertune.HyperTune()
for step in range(1, {REPORTS} + 1):
    value = 1.0 if step == {BEST_STEP} else 0.5 + step / 1000
    tuner.report_hyperparameter_tuning_metric("top_1_accuracy", value, global_step=step if with_step else None)
    time.sleep(0.02)  # an evaluation takes time; the driver (polling every 0.05 s) reads between them
os.makedirs(os.path.join(flags["job-dir"], "model"), exist_ok=True)
'''


def _value(step):
    return 1.0 if step == BEST_STEP else 0.5 + step / 1000


@pytest.mark.parametrize("with_step", [True, False])
def test_the_reader_keeps_every_report_of_the_librarys_rewritten_file(tmp_path, monkeypatch, with_step):
    path = tmp_path / "hypertune.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(path))
    tuner = hypertune.HyperTune()
    reader = runner.MetricsReader(str(path), "accuracy")
    got = []
    for step in range(1, REPORTS + 1):
        tuner.report_hyperparameter_tuning_metric("accuracy", _value(step), global_step=step if with_step else None)
        if step % 7 == 0:  # several reports between two reads, as when a trainer evaluates quickly
            got += reader.new_values()
    got += reader.new_values()
    assert len(path.read_text().splitlines()) == 100  # the library kept only its last 100
    # Without a global_step each report gets the step after the last: the same 1..150.
    assert got == [(step, _value(step)) for step in range(1, REPORTS + 1)]
    assert reader.new_values() == []

    # A rewrite caught halfway (truncated, part written): nothing new, and the cut line waits.
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2 + 7])
    assert reader.new_values() == []
    tuner.report_hyperparameter_tuning_metric("accuracy", 0.25, global_step=REPORTS + 1 if with_step else None)
    assert reader.new_values() == [(REPORTS + 1, 0.25)]


def test_the_reader_reads_an_appended_file_from_where_it_stopped(tmp_path):
    # trainer.task appends one line per evaluation; a line not ended yet waits for the next read.
    path = tmp_path / "hypertune.metrics"
    reader = runner.MetricsReader(str(path), "top_1_accuracy")
    assert reader.new_values() == []  # no file yet
    line = '{"top_1_accuracy": "0.5", "global_step": "%d"}\n'
    path.write_text(line % 50 + (line % 100)[:10])
    assert reader.new_values() == [(50, 0.5)]
    with open(path, "a") as f:
        f.write((line % 100)[10:] + line % 150)
    assert reader.new_values() == [(100, 0.5), (150, 0.5)]  # the same value at new steps: each counts
    assert reader.offset == path.stat().st_size


@pytest.mark.parametrize("with_step", [True, False])
def test_a_trainer_reporting_through_hypertune_150_times_loses_nothing(tmp_path, with_step):
    script = tmp_path / "reporting_trainer.py"
    script.write_text(REPORTING_TRAINER)
    config = write_config(tmp_path, max_trial_count=1, trainer_command=[sys.executable, str(script)])
    job_dir = str(tmp_path / "sweep")
    result = run_driver(config, job_dir, env=driver_env(REPORT_GLOBAL_STEP=int(with_step)))
    assert result.returncode == 0, result.stderr
    [trial] = read_trials(job_dir)
    assert (trial["state"], float(trial["value"]), trial["last_step"]) == ("COMPLETE", 1.0, str(REPORTS))
    stored = optuna.load_study(study_name="study", storage=f"sqlite:///{job_dir}/study.db").trials[0]
    assert stored.intermediate_values == {step: _value(step) for step in range(1, REPORTS + 1)}


def test_the_trainer_runs_with_the_study_container_env_but_not_the_drivers_outputs(tmp_path, monkeypatch):
    script = tmp_path / "env_trainer.py"
    script.write_text(textwrap.dedent('''
        import json, os
        value = float(os.environ["FAKE_VALUE"]) + (os.environ["CLOUD_ML_TRIAL_ID"] == "0")
        value -= 10 * any(name in os.environ for name in ("AIP_MODEL_DIR", "TF_CONFIG"))  # the driver's own job's
        with open(os.environ["CLOUD_ML_HP_METRIC_FILE"], "a") as f:
            f.write(json.dumps({"top_1_accuracy": str(value), "global_step": "1"}) + "\\n")
    '''))
    spec = spec_lib.load(write_config(tmp_path, trainer_command=[sys.executable, str(script)]))
    # The driver's own variables win over the study's.
    spec = dataclasses.replace(spec, trainer_env=(("FAKE_VALUE", "0.25"), ("CLOUD_ML_TRIAL_ID", "7"),
                                                  ("AIP_MODEL_DIR", "gs://b/one-model-for-all")))
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}')
    trial = optuna.create_study(direction="maximize").ask()
    assert runner.run_trial(trial, spec, str(tmp_path / "sweep"), {}, poll_seconds=0.05) == 1.25
    assert os.path.exists(tmp_path / "sweep" / "trial-0000" / runner.METRICS_FILE)
