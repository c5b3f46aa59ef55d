"""The Task objects: targets, losses, evaluation and export outputs of each task, on hand-made numbers."""

import types

import numpy as np
import pytest
import tensorflow as tf

from trainer.tasks import CLASSIFICATION, MULTI_LABEL, TASKS, EvaluationSettings


def test_targets_are_one_hot_or_multi_hot():
    np.testing.assert_array_equal(CLASSIFICATION.target(tf.constant(2, tf.int64), 4).numpy(), [0, 0, 1, 0])
    np.testing.assert_array_equal(MULTI_LABEL.target(tf.constant([3, 0, 3], tf.int64), 4).numpy(), [1, 0, 0, 1])
    np.testing.assert_array_equal(MULTI_LABEL.target(tf.constant([], tf.int64), 3).numpy(), [0, 0, 0])


def test_losses_are_softmax_and_sigmoid_cross_entropy():
    logits, target = np.array([[2.0, 0.0]]), np.array([[1.0, 0.0]])
    softmax = -np.log(np.exp(2) / (np.exp(2) + 1))
    sigmoid = (-np.log(1 / (1 + np.exp(-2))) - np.log(1 - 0.5)) / 2
    config = types.SimpleNamespace(label_smoothing=0.0)
    assert float(CLASSIFICATION.loss(config)(target, logits)) == pytest.approx(softmax, rel=1e-5)
    assert float(MULTI_LABEL.loss(config)(target, logits)) == pytest.approx(sigmoid, rel=1e-5)


def test_classification_evaluation_scores_the_softmax():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    targets = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    result = CLASSIFICATION.evaluate(logits, targets, EvaluationSettings())
    assert result["top_1_accuracy"] == 0.5
    assert result["loss"] == pytest.approx(-(np.log(0.7) + np.log(0.3)) / 2)


def test_multi_label_evaluation_reports_its_thresholds_for_the_export():
    probabilities = np.array([[0.9, 0.2], [0.4, 0.6], [0.3, 0.1]])
    logits = np.log(probabilities / (1 - probabilities))
    targets = np.array([[1, 0], [1, 1], [0, 0]], np.float32)
    fixed = MULTI_LABEL.evaluate(logits, targets, EvaluationSettings("0.5"))
    assert fixed["thresholds"] == [0.5, 0.5] and fixed["micro_recall"] == pytest.approx(2 / 3)
    auto = MULTI_LABEL.evaluate(logits, targets, EvaluationSettings("auto"))
    assert auto["thresholds"][0] == pytest.approx(0.35)  # between 0.4 (a positive) and 0.3 (a negative)
    assert auto["macro_f1"] == 1.0


def test_export_outputs_rank_classes_and_apply_the_thresholds():
    names = tf.constant(["a", "b", "c"])
    logits = tf.math.log(tf.constant([[0.2, 0.7, 0.1]]))
    single = CLASSIFICATION.export_outputs(logits, names, {})
    assert single["classes"].numpy().tolist() == [[1, 0, 2]]
    assert single["class_names"].numpy().tolist() == [[b"b", b"a", b"c"]]
    probabilities = tf.constant([[0.6, 0.9, 0.2]])
    multi = MULTI_LABEL.export_outputs(tf.math.log(probabilities / (1 - probabilities)), names, {"thresholds": [0.5, 0.95, 0.1]})
    assert multi["predictions"].numpy().tolist() == [[True, False, True]]
    assert multi["classes"].numpy().tolist() == [[0, 2, -1]]  # predicted ones, most probable first, then padding
    assert multi["class_names"].numpy().tolist() == [[b"a", b"c", b""]]


def test_each_task_names_its_default_metric_first_and_top_5_needs_six_classes():
    assert TASKS["classification"].metrics[0] == "top_1_accuracy" and TASKS["multi_label"].metrics[0] == "mAP"
    assert "top_5_accuracy" not in CLASSIFICATION.metrics_for(5) and "top_5_accuracy" in CLASSIFICATION.metrics_for(6)


def test_a_multi_label_export_without_its_thresholds_is_refused():
    with pytest.raises(ValueError, match="needs the thresholds"):
        MULTI_LABEL.export_outputs(tf.zeros([1, 2]), tf.constant(["a", "b"]), {})


def test_the_head_gives_one_float32_logit_per_class_under_mixed_precision():
    import keras

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        features = keras.Input((8,))
        logits = CLASSIFICATION.head(features, 3)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert logits.shape == (None, 3) and logits.dtype == "float32"
