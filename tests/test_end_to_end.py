"""One real run per data source and backend, through export and reload on CPU TensorFlow.

The TensorFlow runs call the trainer's main() in this process (trainer_main);
one run starts `python -m trainer.task` as a user does, and the JAX runs
start a process because the backend is chosen once, at Keras' import.
"""

import functools
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from tests.test_run_report import linked_files
from tests.conftest import assert_user_error, encode, run_trainer, tiny_flags, tiny_image, write_folder, write_list, write_tfrecords


def real_image_bytes():
    rng = np.random.default_rng(7)
    return [encode(tiny_image(0, rng), "JPEG"), encode(tiny_image(1, rng), "PNG"), encode(tiny_image(1, rng, 40), "JPEG")]


def best_weights(checkpoints):
    """The best evaluation's weights file, as committed in state.json."""
    return os.path.join(checkpoints, json.load(open(os.path.join(checkpoints, "state.json")))["best_weights"])


def keras_probabilities(job_dir, encoded_images, image_size=16):
    """What the trained Keras model (best weights) says, with the evaluation crop."""
    from trainer import images, models

    config = json.load(open(os.path.join(job_dir, "config.json")))
    model = models.build_model(config["model_type"], config["num_classes"], image_size)
    model.load_weights(best_weights(os.path.join(job_dir, "checkpoints")))
    batch = tf.stack([images.eval_image(tf.constant(b), image_size) for b in encoded_images])
    return tf.nn.softmax(model(batch, training=False)).numpy()


def check_export(job_dir, class_names):
    from trainer import models

    config = json.load(open(os.path.join(job_dir, "config.json")))
    weight_bytes = 4 * models.build_model(config["model_type"], config["num_classes"], 16).count_params()
    variables = os.path.join(job_dir, "model", "variables")
    stored = sum(os.path.getsize(os.path.join(variables, f)) for f in os.listdir(variables))
    assert stored < 1.2 * weight_bytes  # each weight once (float32)
    loaded = tf.saved_model.load(os.path.join(job_dir, "model"))
    assert {"serving_default", "serving_images"} <= set(loaded.signatures)
    encoded = real_image_bytes()
    served = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
    np.testing.assert_allclose(served["probabilities"].numpy(), keras_probabilities(job_dir, encoded), atol=1e-5)
    top = served["classes"].numpy()[:, 0]
    assert list(served["class_names"].numpy()[:, 0].astype(str)) == [class_names[i] for i in top]
    np.testing.assert_allclose(served["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    pixels = tf.io.decode_png(encoded[1], channels=3)[None]
    by_tensor = loaded.signatures["serving_images"](images=pixels)
    assert by_tensor["probabilities"].shape == (1, len(class_names))


def check_outputs(job_dir, result, hypertune_file, eval_steps):
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model/saved_model.pb", "config.json", "metrics.json", "labels.txt"):
        assert os.path.exists(os.path.join(job_dir, name)), name
    metrics = json.load(open(os.path.join(job_dir, "metrics.json")))
    assert best_weights(os.path.join(job_dir, "checkpoints")).endswith(f"best-{metrics['best']['step']}.weights.h5")
    assert any(f.startswith("events") for _, _, files in os.walk(os.path.join(job_dir, "logs")) for f in files)
    metrics = json.load(open(os.path.join(job_dir, "metrics.json")))
    assert [e["step"] for e in metrics["evaluations"]] == eval_steps
    best = max(e["top_1_accuracy"] for e in metrics["evaluations"])
    assert metrics["best"]["top_1_accuracy"] == best
    assert result.stdout.strip().splitlines()[-1] == f"top_1_accuracy={best:.4f}"
    model_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(job_dir, "model")) for f in fs)
    assert re.search(rf"^exported in [\d.]+ s \({model_bytes / 1e6:.0f} MB\)", result.stdout, re.MULTILINE)
    report = os.path.join(job_dir, "report")
    assert {"report.html", "curves.png", "confusion_matrix.png", "per_class.csv"} <= set(os.listdir(report))
    assert linked_files(report) == set(os.listdir(report)) - {"report.html"}  # it shows every file, and only those
    lines = [json.loads(line) for line in open(hypertune_file)]
    assert [line["global_step"] for line in lines] == [str(s) for s in eval_steps]
    assert all(0 <= float(line["top_1_accuracy"]) <= 1 for line in lines)
    return metrics


def test_tfrecord_run_exports_the_best_evaluation(tmp_path, hypertune_file):
    train = write_tfrecords(tmp_path / "train", per_class=12)
    val = write_tfrecords(tmp_path / "val", per_class=4, seed=1, shards=1)
    job = str(tmp_path / "job")
    result = run_trainer(tiny_flags(train, val, job, max_steps=6, eval_frequency=3), hypertune_file)
    metrics = check_outputs(job, result, hypertune_file, [3, 6])
    assert metrics["training_images"] == 24 and metrics["evaluation_images"] == 8
    assert "img/s" in result.stdout and "eta" in result.stdout
    check_export(job, ["0", "1"])


def test_folder_source_takes_class_names_from_subfolders(tmp_path, hypertune_file, trainer_main):
    train = write_folder(tmp_path / "train", per_class=6)
    val = write_folder(tmp_path / "val", per_class=3, seed=1, fmt="JPEG")
    job = str(tmp_path / "job")
    result = trainer_main(tiny_flags(train, val, job), hypertune_file)
    check_outputs(job, result, hypertune_file, [2, 4])
    assert open(os.path.join(job, "labels.txt")).read().split() == ["class_0", "class_1"]
    check_export(job, ["class_0", "class_1"])


def test_image_list_with_one_based_labels_and_label_map(tmp_path, hypertune_file, trainer_main):
    train = write_list(tmp_path / "train", per_class=6, offset=1)
    val = write_list(tmp_path / "val", per_class=3, seed=1, offset=1)
    label_map = tmp_path / "labels.txt"
    label_map.write_text("cat\ndog\n")
    job = str(tmp_path / "job")
    result = trainer_main(tiny_flags(train, val, job, label_offset=1, label_map_path=label_map), hypertune_file)
    check_outputs(job, result, hypertune_file, [2, 4])
    check_export(job, ["cat", "dog"])


def test_vertex_ai_output_variables_override_the_job_dir_layout(tmp_path, hypertune_file, trainer_main):
    train = write_tfrecords(tmp_path / "train")
    job, aip = tmp_path / "job", tmp_path / "aip"
    env = {"AIP_MODEL_DIR": str(aip / "model"), "AIP_CHECKPOINT_DIR": str(aip / "ckpt"),
           "AIP_TENSORBOARD_LOG_DIR": str(aip / "tb")}
    result = trainer_main(tiny_flags(train, train, str(job), max_steps=2), hypertune_file, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (aip / "model" / "saved_model.pb").exists() and os.path.exists(best_weights(str(aip / "ckpt")))
    assert any((aip / "tb").rglob("events*"))
    assert (job / "metrics.json").exists() and not (job / "model").exists()


def _evaluations(job_dir):
    return json.load(open(os.path.join(job_dir, "metrics.json")))["evaluations"]


@pytest.mark.parametrize("backend, devices", [("tensorflow", 1), ("jax", 1), ("jax", 2)])
def test_a_rerun_resumes_exactly_where_the_run_stopped(tmp_path, backend, devices, trainer_main):
    # Adam's slots and step count come back from the checkpoint: the steps after
    # the resume evaluate exactly as in an uninterrupted run (to the last bit of
    # the validation loss, which any difference in the weights would move).
    # (A stepwise schedule: a cosine one spans --max_steps, which the two legs change.)
    # JAX over two devices: each keeps its own batch-norm moving averages, and the
    # checkpoint their mean (models._keep_moving_stats_per_device).
    if backend == "jax":
        pytest.importorskip("jax")
    if backend == "tensorflow":
        run = trainer_main
    else:  # JAX is chosen at import: its own process
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        run = functools.partial(run_trainer, env=env)
    train = write_tfrecords(tmp_path / "train")
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    flags = dict(learning_rate_decay_type="stepwise", backend=backend)
    straight = run(tiny_flags(train, train, whole, max_steps=4, **flags), tmp_path / "whole.metrics")
    assert (f"data parallel over {devices} devices" in straight.stdout) == (devices > 1)
    check_outputs(whole, straight, tmp_path / "whole.metrics", [2, 4])
    assert json.load(open(os.path.join(whole, "config.json")))["backend"] == backend
    check_export(whole, ["0", "1"])  # a JAX run's export serves on TensorFlow too

    first = run(tiny_flags(train, train, split, max_steps=2, **flags), tmp_path / "split.metrics")
    assert first.returncode == 0, first.stderr[-3000:]
    assert [e["step"] for e in _evaluations(split)] == [2]
    resumed = run(tiny_flags(train, train, split, max_steps=4, **flags), tmp_path / "split.metrics")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at step 2" in resumed.stdout
    assert "step 2/4" not in resumed.stdout  # finished steps are not trained again
    assert "Skipping variable loading" not in resumed.stderr
    assert _evaluations(split) == _evaluations(whole)
    best_step = json.load(open(os.path.join(split, "metrics.json")))["best"]["step"]
    assert sorted(os.listdir(os.path.join(split, "checkpoints"))) == sorted([
        f"best-{best_step}.weights.h5", "ckpt-2.weights.h5", "ckpt-4.weights.h5", "state.json"])
    # Without a moving average the best weights are their step's checkpoint: one file, two names.
    assert os.path.samefile(*(os.path.join(split, "checkpoints", f"{kind}-{best_step}.weights.h5")
                              for kind in ("best", "ckpt")))
    if backend == "tensorflow":  # the refusal happens before the backend matters
        other_run = run(tiny_flags(train, train, split, max_steps=8, seed=7, **flags))
        assert_user_error(other_run, "--job-dir holds a checkpoint of a different run (--seed was 42, now 7)")
        assert json.load(open(os.path.join(split, "config.json")))["seed"] == 42  # the refused run wrote nothing
