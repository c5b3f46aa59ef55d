"""`python -m hptuning.study` end to end over a fake trainer (same flags and
metrics-file contract as trainer.task, seconds instead of minutes): outputs,
resume, pruning, killed trainers and workers (failed trials and user errors:
test_hptuning_failures.py). Mistakes in the flags,
the config or the storage run the driver's main() in this process (study_main).
"""

import contextlib
import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from tests.hptuning_helpers import (
    ROOT,
    assert_one_error_line,
    driver_env,
    read_trials,
    run_driver,
    run_log,
    start_driver,
    study_main,
    trials_by_number,
    write_config,
)
from trainer.files import read_json


def test_study_writes_outputs_and_resume_never_reruns(tmp_path):
    config = write_config(tmp_path, max_trial_count=4)
    job_dir, log = str(tmp_path / "sweep"), str(tmp_path / "runs.log")
    first = run_driver(config, job_dir, env=driver_env(FAKE_RUN_LOG=log))
    assert first.returncode == 0, first.stderr
    trials = read_trials(job_dir)
    assert [t["state"] for t in trials] == ["COMPLETE"] * 4
    assert all(os.path.isdir(os.path.join(job_dir, f"trial-{n:04d}")) for n in range(4))
    assert all(t["last_step"] == "3" for t in trials)
    best = read_json(os.path.join(job_dir, "best.json"))
    values = [float(t["value"]) for t in trials]
    assert best["value"] == max(values)
    assert best["model_path"] == os.path.join(job_dir, f"trial-{best['best_trial']:04d}", "model")
    for plot in ("optimization_history", "param_importances", "intermediate_values"):
        assert os.path.getsize(os.path.join(job_dir, "plots", f"{plot}.html")) > 0
    assert f"best: trial {best['best_trial']}" in first.stdout
    # The trial's value is its best evaluation, read from the trainer's own metrics file.
    lines = pathlib.Path(job_dir, "trial-0000", "hypertune.metrics").read_text().splitlines()
    assert float(trials[0]["value"]) == max(float(json.loads(line)["top_1_accuracy"]) for line in lines)

    again = run_driver(config, job_dir, env=driver_env(FAKE_RUN_LOG=log))
    assert again.returncode == 0, again.stderr
    assert "already has 4 finished trials; nothing to run" in again.stdout
    more = run_driver(config, job_dir, "--max_trial_count=5", env=driver_env(FAKE_RUN_LOG=log))
    assert more.returncode == 0, more.stderr
    assert run_log(log) == [0, 1, 2, 3, 4]  # one more trial; none of the finished ones again


def test_median_rule_stops_poor_trials_at_their_first_evaluation(tmp_path):
    config = write_config(tmp_path, max_trial_count=6, early_stopping={"type": "median", "n_startup_trials": 1},
                          parameters={"initial_learning_rate": {"type": "categorical", "values": [0.1, 0.001],
                                                                "default": 0.1}})
    job_dir = str(tmp_path / "sweep")
    # A poor trial that is not stopped blocks for a minute (and then completes, failing the test).
    result = run_driver(config, job_dir, env=driver_env(FAKE_BLOCK_BELOW=0.5))
    assert result.returncode == 0, result.stderr
    trials = read_trials(job_dir)
    poor = [t for t in trials if t["initial_learning_rate"] == "0.001"]
    assert poor, "the seeded sampler should try the poor value at least once"
    assert all(t["state"] == "PRUNED" and t["last_step"] == "1" for t in poor)
    assert all(t["state"] == "COMPLETE" for t in trials if t["initial_learning_rate"] == "0.1")
    assert "pruned at step 1" in result.stdout


def test_a_trainer_killed_by_sigkill_is_retried_with_the_same_parameters(tmp_path):
    config = write_config(tmp_path, max_trial_count=2)
    job_dir = str(tmp_path / "sweep")
    result = run_driver(config, job_dir, env=driver_env(FAKE_SIGKILL="0"))
    assert result.returncode == 0, result.stderr
    trials = trials_by_number(job_dir)
    assert trials[0]["state"] == "FAIL" and "killed by SIGKILL" in trials[0]["failure"]
    retry = [t for t in trials.values() if t["retry_of"] == "0"]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETE" and retry[0]["failure"] == ""
    assert retry[0]["initial_learning_rate"] == trials[0]["initial_learning_rate"]
    assert sum(t["state"] == "COMPLETE" for t in trials.values()) == 2


def _wait_for_first_evaluation(path, proc):
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert proc.poll() is None, proc.communicate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)


def test_a_killed_worker_is_resumed_by_rerunning_the_command(tmp_path):
    config = write_config(tmp_path, max_trial_count=2)
    job_dir, log = str(tmp_path / "sweep"), str(tmp_path / "runs.log")
    worker = start_driver(config, job_dir, env=driver_env(FAKE_BLOCK="0", FAKE_RUN_LOG=log))
    _wait_for_first_evaluation(os.path.join(job_dir, "trial-0000", "hypertune.metrics"), worker)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    trainer_pid = int(pathlib.Path(log).read_text().split()[1])
    while os.path.exists(f"/proc/{trainer_pid}") and "Z" not in _process_state(trainer_pid):
        pass  # the trainer follows its driver (PR_SET_PDEATHSIG); a hang here is the failure

    result = run_driver(config, job_dir, env=driver_env(FAKE_RUN_LOG=log))
    assert result.returncode == 0, result.stderr
    assert "trial 0: its driver process was killed; it runs again as a new trial" in result.stdout
    trials = trials_by_number(job_dir)
    assert trials[0]["state"] == "FAIL"
    assert trials[1]["retry_of"] == "0" and trials[1]["state"] == "COMPLETE"
    assert trials[1]["initial_learning_rate"] == trials[0]["initial_learning_rate"]
    assert sorted(run_log(log)) == [0, 1, 2]


def test_sqlite_is_refused_while_another_driver_uses_it(tmp_path, capsys):
    config = write_config(tmp_path)
    job_dir = tmp_path / "sweep"
    job_dir.mkdir()
    with open(job_dir / "study.db.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("hptuning.study pid 4242 on elsewhere\n")
        held.flush()
        result = study_main(capsys, f"--study_config={config}", f"--job-dir={job_dir}")
    assert result.returncode == 2
    assert_one_error_line(result, "pid 4242", "SQLite is for one driver process", "postgresql://")
    assert not list(job_dir.glob("trial-*"))


@pytest.mark.parametrize("storage, fragment", [
    ("postgresql://tuner:secret@127.0.0.1:1/studies", "cannot open the study storage"),
    ("mysql-ish:/not a url", "not a database URL"),
])
def test_unreachable_storage_is_one_error_and_no_trial(tmp_path, capsys, storage, fragment):
    job_dir = tmp_path / "sweep"
    result = study_main(capsys, f"--study_config={write_config(tmp_path)}", f"--job-dir={job_dir}",
                        f"--storage={storage}")
    assert result.returncode == 2
    line = assert_one_error_line(result, "--storage=", fragment)
    assert "secret" not in line
    assert not list(job_dir.glob("trial-*"))


@pytest.mark.parametrize("overrides, fragments", [
    ({"parameters": {"learning_rate": {"type": "double", "min": 0.1, "max": 1}}},
     ["parameter learning_rate: not a trainer flag"]),
    ({"parameters": {"initial_learning_rate": {"type": "real", "min": 0.1, "max": 1}}},
     ["parameters.initial_learning_rate.type", "double, integer"]),
    ({"parameters": {"train_batch_size": {"type": "discrete", "values": [32, 32.5]}}},
     ["parameter train_batch_size: an int flag", "must be integers"]),
])
def test_bad_config_is_one_error_line_before_any_trial(tmp_path, capsys, overrides, fragments):
    job_dir = tmp_path / "sweep"
    # The real trainer.task: its flag table is what a parameter is checked against (another trainer takes any).
    config = write_config(tmp_path, trainer_command=None, trainer_flags={}, **overrides)
    result = study_main(capsys, f"--study_config={config}", f"--job-dir={job_dir}")
    assert result.returncode == 2
    assert_one_error_line(result, *fragments)
    assert not job_dir.exists()


def test_resuming_with_a_different_search_space_is_refused(tmp_path, capsys):
    job_dir = str(tmp_path / "sweep")
    assert run_driver(write_config(tmp_path, max_trial_count=1), job_dir).returncode == 0
    changed = write_config(tmp_path, max_trial_count=1, goal="minimize")
    result = study_main(capsys, f"--study_config={changed}", f"--job-dir={job_dir}")
    assert result.returncode == 2
    assert_one_error_line(result, "different goal", "--study_name")


def test_a_resumed_seeded_study_tries_new_configurations(tmp_path):
    # A sampler rebuilt with the same seed would replay the first trials' draws.
    config = write_config(tmp_path, max_trial_count=3)
    job_dir = str(tmp_path / "sweep")
    assert run_driver(config, job_dir).returncode == 0
    more = run_driver(config, job_dir, "--max_trial_count=6")
    assert more.returncode == 0, more.stderr
    rates = [t["initial_learning_rate"] for t in read_trials(job_dir)]
    assert len(rates) == 6 and len(set(rates)) == 6


def test_interrupting_the_driver_stops_its_trainers_and_the_rerun_finishes_the_study(tmp_path):
    config = write_config(tmp_path, max_trial_count=3, max_failed_trial_count=1)
    job_dir, log = str(tmp_path / "sweep"), str(tmp_path / "runs.log")
    driver = start_driver(config, job_dir, "--parallel_trial_count=2", env=driver_env(FAKE_BLOCK="0,1", FAKE_RUN_LOG=log))
    for number in (0, 1):
        _wait_for_first_evaluation(os.path.join(job_dir, f"trial-{number:04d}", "hypertune.metrics"), driver)
    driver.send_signal(signal.SIGINT)  # as Ctrl-C does; the trainers sleep for a minute unless stopped
    out, err = driver.communicate(timeout=50)
    assert driver.returncode == 2
    assert_one_error_line(subprocess.CompletedProcess([], 2, out, err), "interrupted", "run the same command again")
    for _, pid in run_log_pids(log):
        assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped by the driver
    trials = read_trials(job_dir)
    assert [t["state"] for t in trials] == ["FAIL", "FAIL"]
    assert all(t["failure"].startswith("interrupted") for t in trials)

    # Interruptions are no failures (max_failed_trial_count is 1): both trials run again.
    again = run_driver(config, job_dir, env=driver_env(FAKE_RUN_LOG=log))
    assert again.returncode == 0, again.stderr
    assert "trial 0 was interrupted; it runs again as a new trial" in again.stdout
    trials = read_trials(job_dir)
    assert sorted(t["retry_of"] for t in trials if t["retry_of"]) == ["0", "1"]
    assert sum(t["state"] == "COMPLETE" for t in trials) == 3


def test_a_trial_that_reports_only_nan_fails_with_the_reason(tmp_path):
    config = write_config(tmp_path, max_trial_count=2)
    job_dir = str(tmp_path / "sweep")
    result = run_driver(config, job_dir, env=driver_env(FAKE_NAN="0"))
    assert result.returncode == 0, result.stderr
    trials = trials_by_number(job_dir)
    assert trials[0]["state"] == "FAIL" and "was NaN" in trials[0]["failure"]
    assert "trial 0 failed: every 'top_1_accuracy' value the trainer reported was NaN" in result.stdout


@pytest.mark.parametrize("overrides, flags, fragments", [
    ({"metric": "val_loss"}, [], ["metric: the trainer does not report 'val_loss'", "top_1_accuracy"]),
    ({"goal": "minimize"}, [], ["goal:", "use maximize"]),
    ({}, ["--heartbeat_interval=0"], ["--heartbeat_interval=0", "at least 1"]),
    ({}, ["--max_trial_count=-2"], ["--max_trial_count=-2", "positive integer"]),
])
def test_settings_the_trainer_cannot_meet_are_one_error_line(tmp_path, capsys, overrides, flags, fragments):
    job_dir = tmp_path / "sweep"
    config = write_config(tmp_path, trainer_command=None, trainer_flags={}, **overrides)  # the real trainer.task
    result = study_main(capsys, f"--study_config={config}", f"--job-dir={job_dir}", *flags)
    assert result.returncode == 2
    assert_one_error_line(result, *fragments)
    assert not job_dir.exists()


@pytest.mark.parametrize("flags, fragments", [
    ([], ["--study_config, --job-dir are required", "see --help"]),
    (["--job_dir=sweep"], ["--study_config is required"]),
    (["--study_config=study.yaml", "--job-dir=gs://bucket/sweep"], ["--job-dir=gs://bucket/sweep", "local folder"]),
    (["--study_config=study.yaml", "--job-dir=a", "--job_dir=b"], ["--job-dir and --job_dir disagree"]),
])
def test_bad_driver_flags_are_one_error_line(capsys, flags, fragments):
    result = study_main(capsys, *flags)
    assert result.returncode == 2
    assert_one_error_line(result, *fragments)


def test_missing_flags_are_reported_before_optuna_is_imported():
    # A process of its own: only a fresh interpreter shows what the driver imports before its checks.
    code = ("import sys; sys.modules['optuna'] = None; "  # importing Optuna now fails
            "from hptuning import study; study.main(['hptuning.study'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=driver_env(), capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert_one_error_line(result, "--study_config, --job-dir are required")


def test_help_reads_like_a_tool(capsys):
    result = study_main(capsys, "--help")
    assert result.returncode == 0
    out = result.stdout
    assert out.startswith("usage: python -m hptuning.study --study_config=FILE --job-dir=DIR")
    assert "python -m hptuning.study --study_config=sample_configs/hptuning/digits.yaml --job-dir=runs/digits-sweep" in out
    assert "--study_config=TEXT    [required]" in out and "--job-dir=TEXT    [required]" in out
    assert "(default 60)" in out  # --heartbeat_interval
    assert "storage and workers:" in out


def run_log_pids(path):
    return [tuple(map(int, line.split())) for line in pathlib.Path(path).read_text().splitlines()]


def _process_state(pid):
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return "gone"
