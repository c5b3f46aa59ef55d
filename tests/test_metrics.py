"""Metrics against small tables worked out by hand."""

import math

import numpy as np
import pytest

from trainer import metrics


@pytest.mark.parametrize("scores, positives, expected", [
    ([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], (1 + 2 / 3) / 2),   # positives at ranks 1 and 3
    ([0.9, 0.8, 0.7, 0.6], [0, 1, 1, 0], (1 / 2 + 2 / 3) / 2),
    ([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0], 1.0),
    ([0.5, 0.5], [1, 0], 0.5),                                 # a tie earns no credit
])
def test_average_precision(scores, positives, expected):
    assert metrics.average_precision(np.array(scores), np.array(positives)) == pytest.approx(expected)


def test_average_precision_of_a_class_without_positives_is_undefined():
    assert math.isnan(metrics.average_precision(np.array([0.1, 0.2]), np.array([0, 0])))


PROBS = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1]])
LABELS = np.array([[1, 0], [0, 1], [1, 1]])


def test_multi_label_at_a_global_threshold():
    got = metrics.multi_label(PROBS, LABELS, np.array([0.5, 0.5]), class_names=["cat", "dog"])
    assert got["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert got["micro_f1"] == pytest.approx(6 / 7)       # tp 3, fp 0, fn 1
    assert got["micro_recall"] == pytest.approx(0.75)
    assert got["exact_match"] == pytest.approx(2 / 3)
    # cat: positives ranked 1 and 2 -> AP 1; dog: scores 0.7+, 0.2-, 0.1+ -> positives at ranks 1 and 3
    assert got["mAP"] == pytest.approx((1.0 + (1 + 2 / 3) / 2) / 2)
    assert got["per_category"]["dog"] == pytest.approx(
        {"ap": (1 + 2 / 3) / 2, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "threshold": 0.5})


def test_auto_thresholds_maximise_each_class_f1():
    thresholds = metrics.best_f1_thresholds(PROBS, LABELS)
    # dog: F1 0.8 accepting all three scores, 0.5 from 0.2 up, 2/3 at 0.7: accept 0.1, halfway to 0
    assert thresholds[1] == pytest.approx(0.05)
    # cat: F1 1.0 accepting 0.6 and 0.9 (not 0.4): halfway between 0.4 and 0.6
    assert thresholds[0] == pytest.approx(0.5)
    tuned = metrics.multi_label(PROBS, LABELS, thresholds)
    assert tuned["macro_f1"] > metrics.multi_label(PROBS, LABELS, np.array([0.5, 0.5]))["macro_f1"]


def test_classification_accuracy_and_loss():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    got = metrics.classification(probs, np.array([0, 1]))
    assert got["top_1_accuracy"] == 0.5
    assert got["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    assert "top_5_accuracy" not in got


def test_top_5_accuracy_with_more_than_five_classes():
    probs = np.tile(np.linspace(0.3, 0.0, 7), (2, 1))  # class 0 ranked first, class 6 last
    assert metrics.classification(probs / probs.sum(axis=1, keepdims=True), np.array([4, 6]))["top_5_accuracy"] == 0.5
