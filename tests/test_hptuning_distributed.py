"""Two driver processes share one study in a real PostgreSQL server started on
loopback for the test: every trial number runs exactly once."""

import collections
import os

import optuna

from tests.hptuning_helpers import (
    driver_env,
    read_trials,
    run_log,
    start_driver,
    write_config,
)
from tests.pg_server import postgres_url  # noqa: F401 (pytest fixture)


def test_two_workers_share_one_postgresql_study(tmp_path, postgres_url):  # noqa: F811
    config = write_config(tmp_path, max_trial_count=6)
    log = str(tmp_path / "runs.log")
    env = driver_env(FAKE_RUN_LOG=log)
    storage = f"--storage={postgres_url}"
    workers = [start_driver(config, str(tmp_path / f"worker{i}"), storage, "--study_name=shared", env=env)
               for i in range(2)]
    results = [(*w.communicate(timeout=300), w.returncode) for w in workers]
    for _, err, code in results:
        assert code == 0, err
        assert "Traceback" not in err
    started = run_log(log)
    assert [n for n, count in collections.Counter(started).items() if count > 1] == []
    assert sorted(started) == list(range(len(started)))
    # Each worker's outputs describe the whole study, whichever worker ran a trial.
    trials = read_trials(str(tmp_path / "worker1"))
    assert len(trials) == len(started)
    for t in trials:
        assert os.path.isdir(t["job_dir"])
    # Together the workers stop at max_trial_count, counting each other's running trials. Two
    # workers that check at the same instant may both start one: at most one extra per other worker.
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    assert 6 <= [t.state for t in study.trials].count(optuna.trial.TrialState.COMPLETE) <= 7
