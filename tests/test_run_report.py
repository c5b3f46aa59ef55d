"""The run report: every file written, report.html links only to files beside it, hand-computed per-class tables."""

import csv
import html.parser
import os

import numpy as np
import pytest

from trainer import run_report

CLASSES = ["a", "b", "c"]


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]


def linked_files(report_dir):
    """Every src/href of report.html, each checked to be a relative link to a file in report_dir."""
    parser = _Links()
    with open(os.path.join(report_dir, "report.html"), encoding="utf-8") as f:
        parser.feed(f.read())
    for link in parser.links:
        assert "://" not in link and not link.startswith("/") and os.path.isfile(os.path.join(report_dir, link)), link
    return set(parser.links)


def history(metric, steps=(2, 4, 6)):
    evaluations = [{"step": s, metric: 0.5 + s / 20, "loss": 1.0 / s} for s in steps]
    training_log = [{"step": s, "loss": 2.0 / s, "learning_rate": 0.1 / s} for s in range(1, steps[-1] + 1)]
    return evaluations, training_log


def write(path, task_name, class_names=CLASSES, validation=None, best=None, config=None):
    metric = "top_1_accuracy" if task_name == "classification" else "mAP"
    evaluations, training_log = history(metric)
    best = {**evaluations[-1], **(best or {})}
    return run_report.write(str(path), config=config or {"job_dir": "runs/x", "image_size": 16},
                            evaluations=evaluations, training_log=training_log, best=best, metric=metric,
                            task_name=task_name, class_names=class_names, validation=validation)


def images(count, size=16):
    return np.random.default_rng(0).integers(0, 255, (count, size, size, 3), dtype=np.uint8)


def one_hot(ids, classes=3):
    return np.eye(classes)[ids]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_a_classification_report_shows_everything_and_links_only_to_its_files(tmp_path):
    true = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]  # a->b once, b->c once
    probabilities = 0.1 + 0.7 * one_hot(predicted)
    written = write(tmp_path / "report", "classification", validation=(images(6), one_hot(true), probabilities))
    expected = {"report.html", "curves.png", "confusion_matrix.png", "per_class.csv", "worst.png"}
    assert set(written) == expected == set(os.listdir(tmp_path / "report"))
    assert linked_files(tmp_path / "report") == expected - {"report.html"}
    assert read_csv(tmp_path / "report" / "per_class.csv") == [
        ["class", "precision", "recall", "f1", "support"],
        ["a", "1", "0.666667", "0.8", "3"],
        ["b", "0.5", "0.5", "0.5", "2"],
        ["c", "0.5", "1", "0.666667", "1"],
    ]
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Best top_1_accuracy: <b>0.8000</b> at step 6" in page
    assert "<td>image_size</td><td>16</td>" in page  # the config
    assert "The 2 misclassified validation images" in page


def test_two_classes_all_right_need_no_grid_of_mistakes(tmp_path):
    true = [0, 1, 1, 0]
    write(tmp_path / "report", "classification", class_names=["no", "yes"],
          validation=(images(4), one_hot(true, 2), 0.2 + 0.6 * one_hot(true, 2)))
    assert set(os.listdir(tmp_path / "report")) == {"report.html", "curves.png", "confusion_matrix.png", "per_class.csv"}
    assert "worst.png" not in linked_files(tmp_path / "report")
    assert "No validation image was misclassified." in (tmp_path / "report" / "report.html").read_text()


def test_a_multi_label_report_shows_ap_and_thresholds_per_class(tmp_path):
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], float)
    probabilities = np.array([[0.9, 0.2, 0.1], [0.6, 0.3, 0.1], [0.7, 0.8, 0.1], [0.1, 0.1, 0.6]])
    thresholds = [0.5, 0.25, 0.5]
    write(tmp_path / "report", "multi_label", validation=(images(4), targets, probabilities),
          best={"thresholds": thresholds})
    expected = {"report.html", "curves.png", "per_class_ap.png", "per_class.csv", "worst.png"}
    assert set(os.listdir(tmp_path / "report")) == expected
    assert linked_files(tmp_path / "report") == expected - {"report.html"}
    # a: ranked 0.9+, 0.7-, 0.6+ -> AP (1 + 2/3) / 2; predicted 0.9, 0.6, 0.7 -> precision 2/3, recall 1.
    # b: ranked 0.8+, 0.3+ -> AP 1; predicted 0.8, 0.3 -> all right.  c: no positive -> no AP; one false alarm.
    assert read_csv(tmp_path / "report" / "per_class.csv") == [
        ["class", "ap", "precision", "recall", "f1", "threshold", "support"],
        ["a", "0.833333", "0.666667", "1", "0.8", "0.5", "2"],
        ["b", "1", "1", "1", "1", "0.25", "2"],
        ["c", "", "0", "0", "0", "0.5", "0"],
    ]


@pytest.mark.parametrize("task_name, best, expected", [
    ("classification", {}, {"report.html", "curves.png"}),
    ("multi_label", {}, {"report.html", "curves.png"}),
    ("multi_label", {"per_category": {name: {"ap": 0.5, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "threshold": 0.5}
                                      for name in CLASSES}}, {"report.html", "curves.png", "per_class_ap.png", "per_class.csv"}),
])
def test_without_validation_arrays_the_report_shows_what_the_evaluations_hold(tmp_path, task_name, best, expected):
    write(tmp_path / "report", task_name, best=best)
    assert set(os.listdir(tmp_path / "report")) == expected
    assert linked_files(tmp_path / "report") == expected - {"report.html"}


def test_names_and_config_values_are_text_in_the_page_and_in_the_plots(tmp_path):
    names = ["<script>alert(1)</script>", "cost $5", "$x^$ & co"]  # "$...$" would be TeX to matplotlib
    true = [0, 1, 2, 0]
    write(tmp_path / "report", "classification", class_names=names, config={"job_dir": 'runs/"<b>"'},
          validation=(images(4), one_hot(true), 0.2 + 0.6 * one_hot([1, 2, 0, 0])))
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "runs/&quot;&lt;b&gt;&quot;" in page and "<b>\"" not in page
    assert "$x^$ &amp; co" in page
    assert "worst.png" in linked_files(tmp_path / "report")


def test_a_new_report_replaces_the_old_folder_whole(tmp_path):
    true = [0, 1, 2, 1]
    write(tmp_path / "report", "classification", validation=(images(4), one_hot(true), one_hot([1, 1, 2, 1])))
    assert "worst.png" in os.listdir(tmp_path / "report")
    write(tmp_path / "report", "classification")
    assert set(os.listdir(tmp_path / "report")) == {"report.html", "curves.png"}  # nothing stale
    assert os.listdir(tmp_path) == ["report"]  # no temporary folder left beside it


def test_many_classes_get_an_id_matrix_and_the_most_confused_pairs_by_name(tmp_path):
    classes = 60
    true = np.arange(120) % classes
    predicted = np.where(true == 7, 8, true)
    names = [f"class_{i}" for i in range(classes)]
    write(tmp_path / "report", "classification", class_names=names,
          validation=(None, one_hot(true, classes), one_hot(predicted, classes)))
    assert set(os.listdir(tmp_path / "report")) == {"report.html", "curves.png", "confusion_matrix.png", "per_class.csv"}
    page = (tmp_path / "report" / "report.html").read_text()
    assert "The axes show class ids" in page
    assert "<tr><td>class_7</td><td>class_8</td><td>2</td><td>1.0000</td></tr>" in page


def test_validation_arrays_of_the_wrong_shape_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"must both be \[N, 3\]"):
        write(tmp_path / "report", "classification", validation=(None, np.zeros((4, 2)), np.zeros((4, 2))))
    assert not os.path.exists(tmp_path / "report")
