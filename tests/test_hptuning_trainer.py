"""The study driver over the real trainer (`python -m trainer.task`) on a few
dozen tiny images: each trial trains in its own job-dir, reports through the
hypertune metrics file, and the best trial's SavedModel is the answer."""

import os

import numpy as np
import pytest

from tests.hptuning_helpers import driver_env, read_trials, run_driver, write_config
from trainer.files import read_json


def write_images(folder, per_class=12):
    from PIL import Image

    rng = np.random.RandomState(0)
    for label, shade in enumerate((40, 210)):  # two classes a network separates in a few steps
        os.makedirs(os.path.join(folder, f"class{label}"), exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(shade, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"class{label}", f"{i}.png"))


def test_study_over_the_real_trainer(tmp_path):
    write_images(str(tmp_path / "train"))
    write_images(str(tmp_path / "validation"), per_class=6)
    config = write_config(
        tmp_path, max_trial_count=2, trainer_command="python -m trainer.task",
        trainer_flags={"training_data_path": str(tmp_path / "train"),
                       "validation_data_path": str(tmp_path / "validation"), "num_classes": 2,
                       "model_type": "resnet-18", "image_size": 16, "max_steps": 4, "eval_frequency": 2,
                       "train_batch_size": 8, "eval_batch_size": 12, "log_frequency": 2, "random_flip": False},
        parameters={"initial_learning_rate": {"type": "double", "min": 0.01, "max": 0.1, "scale": "log"},
                    "optimizer_type": {"type": "categorical", "values": ["momentum", "adam"]}})
    job_dir = str(tmp_path / "sweep")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = run_driver(config, job_dir, env=driver_env(TMPDIR=scratch), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list(scratch.iterdir())  # trainers leave nothing in the temporary folder (autograph's files included)
    trials = read_trials(job_dir)
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(t["last_step"] == "4" for t in trials)  # evaluations at steps 2 and 4 reached the driver
    for t in trials:
        metrics = read_json(os.path.join(t["job_dir"], "metrics.json"))
        assert float(t["value"]) == pytest.approx(metrics["best"]["top_1_accuracy"], abs=1e-6)
    best = read_json(os.path.join(job_dir, "best.json"))
    assert os.path.exists(os.path.join(best["model_path"], "saved_model.pb"))
    assert os.path.dirname(best["model_path"]).startswith(job_dir)
    # The study's page shows the best trial's own run report, and the summary names the page.
    page = open(os.path.join(job_dir, "report.html")).read()
    best_report = os.path.join(best["job_dir"], "report", "report.html")
    assert os.path.exists(best_report)
    assert f"<iframe src='{os.path.relpath(best_report, job_dir)}'>" in page
    assert f"report: {os.path.join(job_dir, 'report.html')}" in result.stdout
