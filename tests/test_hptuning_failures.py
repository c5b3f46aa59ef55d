"""Failed trials, over the fake trainer: a failed trial (the defaults' one
too) is made up to max_trial_count; a user error every trial would repeat
stops the study after one trial with the trainer's own `error:` line, and
runs again once fixed; a study where every trial fails exits non-zero.
"""

import json

import pytest

from tests.hptuning_helpers import (
    assert_one_error_line,
    driver_env,
    read_trials,
    run_driver,
    run_log,
    trials_by_number,
    write_config,
)

DEFAULT_LR = {"initial_learning_rate": {"type": "double", "min": 0.001, "max": 1.0, "scale": "log", "default": 0.1}}


def _states(job_dir):
    return {number: t["state"] for number, t in trials_by_number(job_dir).items()}


def test_a_crashing_trial_fails_alone_and_is_made_up(tmp_path):
    config = write_config(tmp_path, max_trial_count=3)
    job_dir = str(tmp_path / "sweep")
    result = run_driver(config, job_dir, env=driver_env(FAKE_CRASH="1"))
    assert result.returncode == 0, result.stderr
    assert _states(job_dir) == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE", 3: "COMPLETE"}
    assert "trial 1 failed: trainer exited with status 1: RuntimeError: fake crash" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("max_trial_count", [1, 3])
def test_a_failing_defaults_trial_is_made_up(tmp_path, max_trial_count):
    config = write_config(tmp_path, max_trial_count=max_trial_count, parameters=DEFAULT_LR)
    job_dir = str(tmp_path / "sweep")
    result = run_driver(config, job_dir, env=driver_env(FAKE_CRASH="0"))
    assert result.returncode == 0, result.stderr
    trials = trials_by_number(job_dir)
    assert trials[0]["state"] == "FAIL" and trials[0]["initial_learning_rate"] == "0.1"
    assert sorted(trials) == list(range(max_trial_count + 1))
    assert sum(t["state"] == "COMPLETE" for t in trials.values()) == max_trial_count


@pytest.mark.parametrize("max_trial_count, max_failed, last", [(1, None, 2), (5, 2, 1)])
def test_a_study_whose_every_trial_fails_exits_non_zero(tmp_path, max_trial_count, max_failed, last):
    overrides = {} if max_failed is None else {"max_failed_trial_count": max_failed}
    config = write_config(tmp_path, max_trial_count=max_trial_count, parameters=DEFAULT_LR, **overrides)
    job_dir = str(tmp_path / "sweep")
    result = run_driver(config, job_dir, env=driver_env(FAKE_CRASH="0,1,2,3,4,5"))
    assert result.returncode == 1
    failed = max_failed or 3  # the default
    assert_one_error_line(result, f"study stopped: {failed} trials failed (max_failed_trial_count: {failed})",
                          f"trial {last}: trainer exited with status 1: RuntimeError: fake crash")
    assert [t["state"] for t in read_trials(job_dir)] == ["FAIL"] * failed  # outputs are still written
    assert "no trial has completed" in result.stdout


def test_a_user_error_stops_the_study_after_one_trial_and_the_fixed_rerun_runs_it_again(tmp_path):
    config = write_config(tmp_path, max_trial_count=3, parameters=DEFAULT_LR)
    job_dir, log = str(tmp_path / "sweep"), str(tmp_path / "runs.log")
    result = run_driver(config, job_dir, env=driver_env(FAKE_USER_ERROR="0,1,2,3", FAKE_RUN_LOG=log))
    assert result.returncode == 2
    line = assert_one_error_line(result, "trial 0's trainer", "run the same command again")
    assert line.startswith("error: --training_data_path=/no/such/data: no files match (fake user error) (")
    assert run_log(log) == [0]  # one trainer start-up, not one per allowed failure
    assert [t["state"] for t in read_trials(job_dir)] == ["FAIL"]

    # Fixed: the same command runs the defaults' trial again, and the failure counts for nothing.
    again = run_driver(config, job_dir, env=driver_env(FAKE_RUN_LOG=log))
    assert again.returncode == 0, again.stderr
    assert "trial 0 stopped the study with a user error; it runs again as a new trial" in again.stdout
    trials = trials_by_number(job_dir)
    assert trials[1]["retry_of"] == "0" and trials[1]["initial_learning_rate"] == "0.1"
    assert [t["state"] for t in trials.values()] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]


def test_a_user_error_naming_a_tuned_flag_fails_that_trial_alone(tmp_path):
    # The trainer refused this trial's value, not something every trial shares: the search goes on.
    config = write_config(tmp_path, max_trial_count=2)
    job_dir = str(tmp_path / "sweep")
    result = run_driver(config, job_dir, env=driver_env(FAKE_USER_ERROR="1", FAKE_ERROR_FLAG="initial_learning_rate"))
    assert result.returncode == 0, result.stderr
    assert _states(job_dir) == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE"}
    assert "trial 1 failed: trainer exited with status 2: error: --initial_learning_rate=" in result.stdout


def test_a_combination_the_built_in_trainer_refuses_fails_that_trial_without_starting_it(tmp_path):
    # nesterov is an argument of SGD with momentum only: every trial the sampler gives adam or rmsprop
    # fails on its own, in the driver, with the trainer's own line; the study is not stopped by it.
    config = write_config(
        tmp_path, max_trial_count=2, max_failed_trial_count=2, trainer_command="python -m trainer.task",
        trainer_flags={"training_data_path": "t", "validation_data_path": "v", "num_classes": 2, "max_steps": 5,
                       "optimizer_arguments": "nesterov=true"},
        parameters={"optimizer_type": {"type": "categorical", "values": ["adam", "rmsprop"]}})
    job_dir = tmp_path / "sweep"
    result = run_driver(config, str(job_dir))
    assert result.returncode == 1, result.stderr  # max_failed_trial_count, not a user error (2)
    trials = trials_by_number(str(job_dir))
    assert [t["state"] for t in trials.values()] == ["FAIL", "FAIL"]
    for t in trials.values():
        assert t["failure"].startswith(
            f"error: --optimizer_arguments 'nesterov' is not an argument of the {t['optimizer_type']} optimizer")
    assert not list(job_dir.glob("trial-*/trainer.log"))  # no trainer was started


def test_a_trial_stopped_more_often_than_it_may_be_retried_counts_as_failed():
    import optuna
    from optuna.trial import TrialState, create_trial

    from hptuning import outputs, storage

    study = optuna.create_study()
    fresh = create_trial(state=TrialState.FAIL, user_attrs={"interrupted": True})
    spent = create_trial(state=TrialState.FAIL, user_attrs={"interrupted": True},
                         system_attrs={"retry_history": [90 + i for i in range(storage.MAX_RETRIES)]})
    for trial in (fresh, spent):
        study.add_trial(trial)
    assert [number for number, _ in storage.requeue_stopped(study)] == [0]  # only the first runs again
    assert [t.number for t in outputs.unretried_failures(study.get_trials())] == [1]


def test_a_user_error_stops_the_trials_running_beside_it_and_they_run_again(tmp_path):
    config = write_config(tmp_path, max_trial_count=2, parallel_trial_count=2)
    job_dir = str(tmp_path / "sweep")
    # Trial 1 would train for a minute; trial 0's user error stops it now, not when it finishes.
    result = run_driver(config, job_dir, env=driver_env(FAKE_USER_ERROR="0", FAKE_BLOCK="1"))
    assert result.returncode == 2
    assert_one_error_line(result, "trial 0's trainer")
    trials = trials_by_number(job_dir)
    assert [t["state"] for t in trials.values()] == ["FAIL", "FAIL"]
    assert trials[1]["failure"].startswith("stopped: another trial met a user error")
    again = run_driver(config, job_dir)
    assert again.returncode == 0, again.stderr
    assert sum(t["state"] == "COMPLETE" for t in trials_by_number(job_dir).values()) == 2


@pytest.mark.parametrize("timeout, vertex", [("1s", False), ("1s", True)])
def test_a_trial_past_its_timeout_is_stopped_and_fails_with_the_reason(tmp_path, timeout, vertex):
    # Trial 0's trainer hangs after its first report; trial_timeout (or Vertex's trialJobSpec.scheduling.timeout)
    # stops it, the trial fails with the reason, and the study goes on.
    if vertex:
        import sys

        from tests.hptuning_helpers import fake_trainer

        config = tmp_path / "vertex.yaml"
        config.write_text(json.dumps({
            "studySpec": {"metrics": [{"metricId": "top_1_accuracy", "goal": "MAXIMIZE"}],
                          "parameters": [{"parameterId": "initial_learning_rate",
                                          "doubleValueSpec": {"minValue": 0.001, "maxValue": 1.0},
                                          "scaleType": "UNIT_LOG_SCALE"}]},
            "maxTrialCount": 2,
            "trialJobSpec": {"scheduling": {"timeout": timeout},
                             "workerPoolSpecs": [{"containerSpec": {"imageUri": "x", "command": [sys.executable, fake_trainer(tmp_path)],
                                                                    "args": ["--max_steps=3"]}}]},
            "sampler": {"type": "random", "seed": 0}}))
        config = str(config)
    else:
        config = write_config(tmp_path, max_trial_count=2, trial_timeout=timeout)
    job_dir = str(tmp_path / "sweep")
    result = run_driver(config, job_dir, env=driver_env(FAKE_BLOCK="0"))
    assert result.returncode == 0, result.stderr
    assert _states(job_dir) == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE"}
    assert "trial 0 failed: stopped after 1 s: longer than trial_timeout" in result.stdout


def test_a_trial_timeout_must_be_a_duration(tmp_path):
    config = write_config(tmp_path, trial_timeout="soon")
    result = run_driver(config, str(tmp_path / "sweep"))
    assert_one_error_line(result, "trial_timeout: 'soon'; give seconds, or a duration like '90m'")
