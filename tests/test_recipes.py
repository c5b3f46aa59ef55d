"""The training recipe's controls, each shown to change what a run does: epochs and epoch-based
evaluation, the time budget, early stopping, the weights' moving average, head-first fine-tuning,
hard example mining, checkpoints kept, synchronised batch norm, the loss split on the progress line,
and exact resume with all of them on. (The data side, augmentation and class balancing, is
tests/test_augment.py; the schedules are tests/test_schedules.py.)"""

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from tests.conftest import ROOT, assert_user_error, tiny_flags, write_tfrecords
from trainer import config as config_lib


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    return write_tfrecords(root / "train", per_class=16), write_tfrecords(root / "val", per_class=4, seed=1, shards=1)


def _json(job_dir, name):
    return json.load(open(os.path.join(job_dir, name)))


def _steps(job_dir):
    return [e["step"] for e in _json(job_dir, "metrics.json")["evaluations"]]


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("2h", 7200), ("45s", 45), ("1.5", 5400), (" 2H ", 7200),
                                           ("0.25h", 900)])
def test_time_budget_forms(text, seconds):
    assert config_lib.duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-1h", "0", "inf", "1d", "ninety minutes"])
def test_time_budget_refuses_what_is_not_a_duration(text):
    assert config_lib.duration_seconds(text) is None


@pytest.mark.parametrize("text, expected", [("1000", (1000, "steps")), ("1e", (1.0, "epochs")), ("0.5E", (0.5, "epochs")),
                                            ("0", None), ("1.5", None), ("e", None), ("-2e", None), ("ten", None)])
def test_eval_frequency_in_steps_or_epochs(text, expected):
    assert config_lib.parse_frequency(text) == expected


@pytest.mark.parametrize("args, message", [
    (["--max_steps=10", "--num_epochs=2"], "give exactly one of --max_steps and --num_epochs"),
    (["--num_epochs=-1"], "--num_epochs must be positive"),
    (["--max_steps=10", "--eval_frequency=1.5"], "--eval_frequency must be a positive number of steps, or of epochs"),
    (["--max_steps=10", "--max_training_time=soon"], "--max_training_time must be a duration like '90m'"),
    (["--max_steps=10", "--learning_rate_decay_type=strategy"], "--learning_rate_strategy is required"),
    (["--max_steps=10", "--learning_rate_decay_type=strategy", "--learning_rate_strategy=5:0.1->,10:0.2"],
     "segment 1 '5:0.1->'"),
    (["--max_steps=10", "--learning_rate_strategy=5:0.1"], "needs --learning_rate_decay_type=strategy"),
    (["--max_steps=10", "--ema_decay=1"], "--ema_decay must be in [0, 1)"),
    (["--max_steps=10", "--ohem_top_ratio=0"], "--ohem_top_ratio must be in (0, 1]"),
    (["--max_steps=10", "--freeze_backbone_steps=10"], "--freeze_backbone_steps must be below max_steps=10"),
    (["--max_steps=10", "--weight_decay=inf"], "--weight_decay must be a finite number"),
    (["--max_steps=10", "--mixup_alpha=-0.2"], "--mixup_alpha must be >= 0"),
    (["--max_steps=10", "--augmentation=autoaugment"], "--augmentation must be one of basic, randaugment, augmix, none"),
    (["--max_steps=10", "--class_balancing=oversample"], "--class_balancing must be one of none, weights, sampler"),
])
def test_recipe_flags_are_checked_before_training(tmp_path, trainer_main, args, message):
    base = ["--training_data_path=t", "--validation_data_path=v", "--num_classes=3", f"--job-dir={tmp_path}"]
    assert_user_error(trainer_main(base + args), message)


def test_num_epochs_and_epoch_eval_frequency_count_in_passes_over_the_data(tmp_path, data, trainer_main):
    # 32 training images in batches of 8: 4 steps an epoch.
    job_dir = str(tmp_path / "run")
    flags = tiny_flags(*data, job_dir, num_epochs=1.5, eval_frequency="0.5e", log_frequency=1, max_batch_fraction=0)
    result = trainer_main([f for f in flags if not f.startswith("--max_steps")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert _steps(job_dir) == [2, 4, 6]
    config = _json(job_dir, "config.json")
    assert (config["max_steps"], config["eval_frequency"]) == (6, 2)


def test_a_spent_time_budget_ends_the_run_with_an_export(tmp_path, data, trainer_main):
    job_dir = str(tmp_path / "run")
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=10_000, eval_frequency=5_000, max_training_time="0.1s"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the time budget (--max_training_time, 0:00:00) is spent" in result.stdout
    steps = _steps(job_dir)
    assert len(steps) == 1 and steps[0] < 10_000  # evaluated where it stopped
    assert os.path.exists(os.path.join(job_dir, "model", "saved_model.pb"))
    again = trainer_main(tiny_flags(*data, job_dir, max_steps=10_000, eval_frequency=5_000, max_training_time="0.1s"))
    assert "nothing left to train" in again.stdout  # the budget counts the time the job-dir has already trained
    assert _steps(job_dir) == steps


def test_early_stopping_stops_when_the_metric_stalls(tmp_path, data, trainer_main):
    job_dir = str(tmp_path / "run")
    # No accuracy can improve by more than 1: the second evaluation is one without improvement.
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=12, eval_frequency=2, early_stopping_patience=1,
                                     early_stopping_min_delta=1.0))
    assert result.returncode == 0, result.stderr[-2000:]
    assert _steps(job_dir) == [2, 4]
    assert "stopping at step 4: top_1_accuracy has not improved by more than 1 for 1 evaluations" in result.stdout
    assert os.path.exists(os.path.join(job_dir, "model", "saved_model.pb"))


def _h5_arrays(path, prefix):
    with h5py.File(path, "r") as f:
        found = {}
        f.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset)
                     and name.startswith(prefix) else None)
        return found


def test_the_moving_average_is_evaluated_kept_as_best_and_exported(tmp_path, data, trainer_main):
    job_dir = str(tmp_path / "run")
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=6, eval_frequency=6, ema_decay=0.5,
                                     optimizer_type="momentum", initial_learning_rate=0.1))
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoints = os.path.join(job_dir, "checkpoints")
    best = _h5_arrays(os.path.join(checkpoints, "best-6.weights.h5"), "layers/")
    raw = _h5_arrays(os.path.join(checkpoints, "ckpt-6.weights.h5"), "layers/")
    slots = list(_h5_arrays(os.path.join(checkpoints, "ckpt-6.weights.h5"), "optimizer/").values())
    head = "layers/dense/vars/0"
    assert not np.allclose(best[head], raw[head])  # the best weights are not the raw ones ...
    assert any(s.shape == best[head].shape and np.array_equal(s, best[head]) for s in slots)  # ... but the average
    import tensorflow as tf

    from trainer import models

    pixels = tf.constant(np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3)), tf.uint8)
    served = tf.saved_model.load(os.path.join(job_dir, "model")).signatures["serving_images"](images=pixels)
    model = models.build_model("resnet-18", 2, 16)
    model.load_weights(os.path.join(checkpoints, "best-6.weights.h5"))
    np.testing.assert_allclose(served["probabilities"].numpy(), tf.nn.softmax(model(pixels, training=False)).numpy(),
                               atol=1e-5)  # the export is the averaged weights


def test_a_frozen_backbone_keeps_its_weights_until_the_step_given(tmp_path, data, trainer_main):
    from trainer import models

    job_dir = str(tmp_path / "run")
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=4, eval_frequency=2, freeze_backbone_steps=2,
                                     optimizer_type="momentum", initial_learning_rate=0.1))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training the head only until step 2" in result.stdout
    initial = models.build_model("resnet-18", 2, 16, seed=42)
    kernels = [v for v in initial.get_layer("backbone").trainable_variables if "kernel" in v.path]
    ckpt = os.path.join(job_dir, "checkpoints", "ckpt-{}.weights.h5")
    after_2 = _h5_arrays(ckpt.format(2), "layers/")
    after_4 = _h5_arrays(ckpt.format(4), "layers/")
    initial_values = {v.shape: v.numpy() for v in kernels}  # a conv kernel of each shape
    frozen = [a for a in after_2.values() if a.shape in initial_values and np.array_equal(a, initial_values[a.shape])]
    moved = [a for a in after_4.values() if a.shape in initial_values and np.array_equal(a, initial_values[a.shape])]
    assert len(frozen) >= len(initial_values)  # every sampled backbone kernel untouched after 2 steps
    assert not moved  # and trained after 4
    assert not np.allclose(after_2["layers/dense/vars/0"], initial.get_layer("logits").get_weights()[0])


def test_hard_example_mining_averages_the_hardest_fraction():
    import keras

    from trainer import models

    y_true = np.eye(4, dtype="float32")[[0, 1, 2, 3, 0, 1, 2, 3]]
    logits = np.random.default_rng(0).normal(size=(8, 4)).astype("float32") * 3
    plain = keras.losses.CategoricalCrossentropy(from_logits=True)
    per_image = keras.losses.categorical_crossentropy(y_true, logits, from_logits=True).numpy()
    for ratio, kept in ((0.5, 4), (0.3, 3), (1.0, 8), (0.01, 1)):
        expected = np.sort(per_image)[::-1][:kept].mean()
        assert np.isclose(float(models.HardestFraction(plain, ratio)(y_true, logits)), expected, rtol=1e-5)
    weights = np.arange(1, 9, dtype="float32")
    expected = np.sort(per_image * weights)[::-1][:4].sum() / 8 * 2  # weights apply, then the mean of the 4 kept
    hardest = np.argsort(per_image)[::-1][:4]
    expected = (per_image * weights)[hardest].sum() / 4
    assert np.isclose(float(models.HardestFraction(plain, 0.5)(y_true, logits, sample_weight=weights)), expected, rtol=1e-5)


def test_checkpoints_beyond_max_to_keep_are_removed_but_never_the_best(tmp_path, data, trainer_main):
    job_dir = str(tmp_path / "run")
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=5, eval_frequency=1, max_to_keep=2))
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(os.listdir(os.path.join(job_dir, "checkpoints")))
    best = _json(job_dir, "metrics.json")["best"]["step"]
    assert [n for n in names if n.startswith("ckpt-")] == ["ckpt-4.weights.h5", "ckpt-5.weights.h5"]
    assert [n for n in names if n.startswith("best-")] == [f"best-{best}.weights.h5"]


def test_the_progress_line_shows_the_data_loss_and_weight_decay_apart(tmp_path, data, trainer_main):
    job_dir = str(tmp_path / "run")
    result = trainer_main(tiny_flags(*data, job_dir, max_steps=2, eval_frequency=2, log_frequency=1,
                                     weight_decay=0.01))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "+ weight decay" in result.stdout
    log = _json(os.path.join(job_dir, "checkpoints"), "state.json")["training_log"]
    assert [row["step"] for row in log] == [1, 2]
    assert all(row["loss"] > row["data_loss"] > 0 for row in log)
    plain = trainer_main(tiny_flags(*data, str(tmp_path / "plain"), max_steps=2, eval_frequency=2, weight_decay=0))
    assert "weight decay" not in plain.stdout


def test_a_run_with_every_recipe_on_resumes_exactly(tmp_path, data, trainer_main):
    flags = dict(learning_rate_decay_type="stepwise", ema_decay=0.9, ohem_top_ratio=0.5, mixup_alpha=0.2,
                 cutmix_alpha=1.0, class_balancing="sampler", augmentation="randaugment", random_erasing=0.5,
                 freeze_backbone_steps=1, early_stopping_patience=5)
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    assert trainer_main(tiny_flags(*data, whole, max_steps=6, **flags)).returncode == 0
    assert trainer_main(tiny_flags(*data, split, max_steps=3, **flags)).returncode == 0  # stops between evaluations
    resumed = trainer_main(tiny_flags(*data, split, max_steps=6, **flags))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from the checkpoint at step 3" in resumed.stdout
    evaluations = _json(split, "metrics.json")["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 3, 4, 6]  # evaluations stay on multiples of eval_frequency
    by_step = {e["step"]: e for e in _json(whole, "metrics.json")["evaluations"]}
    assert [e for e in evaluations if e["step"] != 3] == [by_step[s] for s in (2, 4, 6)]


SYNCHRONISED = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from trainer import models
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((1,)), keras.layers.BatchNormalization(momentum=0.0)])
        if SYNC:
            models.set_synchronized_batch_norm(model)
        model.compile(optimizer="sgd", loss="mse")
    # Each device gets one half: all 0 on the first, all 10 on the second.
    x = np.array([[0.0]] * 4 + [[10.0]] * 4, "float32")
    model.fit(x, x, batch_size=8, epochs=1, verbose=0, shuffle=False)
    print(float(model.layers[0].moving_mean.numpy()[0]))
""")


@pytest.mark.parametrize("sync, mean", [(True, 5.0), (False, 0.0)])
def test_synchronised_batch_norm_takes_statistics_over_the_global_batch(sync, mean):
    result = subprocess.run([sys.executable, "-c", f"SYNC = {sync}\n" + SYNCHRONISED], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # Unsynchronised, the moving mean is one device's (the first replica's variables are read back: 0).
    assert np.isclose(float(result.stdout.split()[-1]), mean)


@pytest.mark.parametrize("step, decay", [(0, 0.0), (10, 0.5), (90, 0.9), (990, 0.99), (100_000, 0.999)])
def test_the_moving_average_decay_warms_up(step, decay):
    # Without the warm-up, 0.999 ** 1000 = 37% of a 1,000-step run's average is the random initial weights.
    from trainer import models

    assert float(models.ema_decay_at(float(step), 0.999)) == pytest.approx(decay)
