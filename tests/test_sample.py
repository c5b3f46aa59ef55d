"""The bundled digits sample: a fixed split, and the README's main job reaching 97% top-1."""

import json
import os

import numpy as np
import pytest

from tests.conftest import run_cli, run_trainer
from trainer import sample_data


def test_writing_the_sample_prints_one_line_and_no_tensorflow_noise(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # as in a new user's shell, not the tests' quiet one
    result = run_cli("trainer.sample_data", [str(tmp_path / "digits")])
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"wrote 1437 training and 360 validation digits to {tmp_path / 'digits'}\n"
    assert len(list((tmp_path / "digits").glob("*.tfrecord"))) == 3


def test_split_is_fixed_and_disjoint():
    train_x, train_y, val_x, val_y = sample_data.digits_split()
    again = sample_data.digits_split()
    np.testing.assert_array_equal(val_x, again[2])
    assert len(train_y) == 1437 and len(val_y) == 360 and set(val_y) == set(range(10))
    train_rows = {row.tobytes() for row in train_x}
    assert sum(row.tobytes() in train_rows for row in val_x) < 5  # the digits set has a few exact duplicates


@pytest.mark.slow
def test_readme_main_job_reaches_97_percent(tmp_path, hypertune_file):
    data = tmp_path / "digits"
    assert run_cli("trainer.sample_data", [str(data)]).returncode == 0
    job = tmp_path / "run"
    result = run_trainer([
        "--flagfile=sample_configs/digits.flags",
        f"--training_data_path={data}/train-*.tfrecord",
        f"--validation_data_path={data}/validation-*.tfrecord",
        f"--job-dir={job}",
    ], hypertune_file)
    assert result.returncode == 0, result.stderr[-3000:]
    best = json.load(open(job / "metrics.json"))["best"]["top_1_accuracy"]
    assert best >= 0.97
    assert os.path.exists(job / "model" / "saved_model.pb")
