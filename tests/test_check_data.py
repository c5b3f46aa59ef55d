"""python -m trainer.check_data: the report on a set with the usual problems, every source format, the
JSON report, the reasons given for unreadable images, and --help.

The exit status and the printed report are checked on real processes (two); the rest runs main() in this
process (run_main), which saves the seconds a process spends importing TensorFlow.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest

from tests.conftest import (assert_tool_help, assert_user_error, encode, run_cli, run_main, tiny_image, write_folder,
                            write_list, write_tfrecords)
from trainer import check_data

TRAIN, VALIDATION = 24, 8  # good images, labels alternating 0, 1
LEAKED = (0, 3, 5)  # training images copied into the validation list


def _image(label, rng):
    return encode(tiny_image(label, rng, size=16)[:, :16], "PNG")  # 16x16


@pytest.fixture
def problem_set(tmp_path):
    """Image lists (train.txt, val.txt) with a truncated JPEG, a label out of range, a training image copied
    under another label, and validation images copied from training. Returns the folder."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    train, val = [], []
    for i in range(TRAIN):
        (tmp_path / "img" / f"t{i}.png").write_bytes(_image(i % 2, rng))
        train.append(f"img/t{i}.png {i % 2}")
    jpeg = encode(tiny_image(0, rng, size=16)[:, :16], "JPEG")
    (tmp_path / "img" / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    shutil.copy(tmp_path / "img" / "t2.png", tmp_path / "img" / "t2_again.png")
    train += ["img/broken.jpg 0", "img/t2_again.png 1", "img/t7.png 5"]
    for i in range(VALIDATION):
        (tmp_path / "img" / f"v{i}.png").write_bytes(_image(i % 2, rng))
        val.append(f"img/v{i}.png {i % 2}")
    for i in LEAKED:
        shutil.copy(tmp_path / "img" / f"t{i}.png", tmp_path / "img" / f"copy_of_t{i}.png")
        val.append(f"img/copy_of_t{i}.png {i % 2}")
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(val) + "\n")
    return tmp_path


def _args(folder, **flags):
    flags = {"training_data_path": folder / "train.txt", "validation_data_path": folder / "val.txt",
             "num_classes": 2, "max_corrupt_fraction": 0.1, **flags}
    return [f"--{name}={value}" for name, value in flags.items()]


def _without_bad_label(folder):
    lines = (folder / "train.txt").read_text().splitlines()
    (folder / "train.txt").write_text("\n".join(line for line in lines if not line.endswith(" 5")) + "\n")


def test_a_label_out_of_range_exits_2_with_the_trainers_error_after_the_report(problem_set, tmp_path):
    from trainer import data, sources

    result = run_cli("trainer.check_data", _args(problem_set, output_dir=tmp_path / "report"))
    line = assert_user_error(result, "--training_data_path: label 5 of", "t7.png (line 27 of --training_data_path)",
                             "outside [0, 2)")
    assert result.returncode == 2
    source = sources.open_source(str(problem_set / "train.txt"), "training_data_path")
    with pytest.raises(data.UserError) as trainer_error:
        data.scan(source, 2, sources.RecordFormat(), 0.1)
    assert line == f"error: {trainer_error.value}"  # the trainer's own words
    report = result.stdout
    assert "leakage: 3 of 11 validation images are also training images (same bytes)" in report
    for i in LEAKED:
        assert f"img/copy_of_t{i}.png (line {VALIDATION + LEAKED.index(i) + 1} of --validation_data_path) = " \
               f"{problem_set}/img/t{i}.png (line {i + 1} of --training_data_path)" in report
    assert "broken.jpg (line 25 of --training_data_path): truncated JPEG" in report
    assert "t7.png (line 27 of --training_data_path): label 5" in report
    assert report.rstrip().splitlines()[-2].startswith("result: the trainer would refuse this data: --training_data_path")
    assert (tmp_path / "report" / "report.txt").read_text() in report  # written before the exit
    assert json.loads((tmp_path / "report" / "report.json").read_text())["accepted"] is False


def test_without_the_bad_label_it_exits_0_and_warns_of_the_leakage(problem_set):
    _without_bad_label(problem_set)
    result = run_cli("trainer.check_data", _args(problem_set))
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("error:")]
    lines = result.stdout.splitlines()
    assert "warning: leakage: 3 of 11 validation images are also training images (same bytes); the validation " \
           "metrics overstate how the model does on new images" in lines
    assert "warning: training: 1 of 26 images cannot be read or decoded; the trainer leaves them out" in lines
    assert "warning: training: 1 group of identical images with different labels" in lines
    assert lines[-1] == "result: the trainer would accept this data (4 warnings)"
    counts = lines[lines.index(next(line for line in lines if line.startswith("counts"))):][:8]
    assert counts[1].split() == ["records", "26", "11"] and counts[2].split() == ["usable", "images", "25", "11"]
    assert counts[6].split() == ["also", "in", "training", "(leakage)", "3"]


def test_too_many_unreadable_images_exit_2_as_the_trainer_would(problem_set, capsys):
    _without_bad_label(problem_set)
    result = run_main(check_data.main, _args(problem_set, max_corrupt_fraction=0), capsys)
    assert result.returncode == 2
    assert_user_error(result, "--training_data_path: 1 of 26 images cannot be read or decoded (first: ",
                      "broken.jpg", "raise --max_corrupt_fraction")


def test_the_json_report_has_every_problem(problem_set, tmp_path, capsys):
    _without_bad_label(problem_set)
    out = tmp_path / "report"
    result = run_main(check_data.main, _args(problem_set, output_dir=out), capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.txt").read_text() in result.stdout
    assert set(report) == {"accepted", "error", "warnings", "settings", "class_names", "sets", "leakage"}
    assert report["accepted"] is True and report["error"] is None and len(report["warnings"]) == 4
    train, val = report["sets"]["training"], report["sets"]["validation"]
    assert (train["records"], train["usable"], val["records"], val["usable"]) == (26, 25, 11, 11)
    assert [row["images"] for row in train["images_per_class"]] == [12, 13]
    assert [row["images"] for row in val["images_per_class"]] == [5, 6]
    [broken] = train["unreadable"]
    assert broken["location"].endswith("broken.jpg (line 25 of --training_data_path)")
    assert broken["reason"].startswith("truncated JPEG: it ends before its end-of-image marker (")
    assert broken["bytes"] == (problem_set / "img" / "broken.jpg").stat().st_size
    assert train["image_sizes"]["width"] == {"min": 16, "median": 16, "max": 16}
    assert train["image_sizes"]["commonest"] == [{"size": "16x16", "images": 25}]
    assert [b["pixels"] for b in train["image_sizes"]["shorter_side"]] == \
        ["<32", "32-63", "64-127", "128-223", "224-511", "512-1023", ">=1024"]
    [group] = train["duplicates"]
    assert group["sha256"] == hashlib.sha256((problem_set / "img" / "t2.png").read_bytes()).hexdigest()
    assert [loc.split(" (")[0].rsplit("/", 1)[1] for loc in group["locations"]] == ["t2.png", "t2_again.png"]
    assert group["labels"] == [["0"], ["1"]] and train["duplicate_copies"] == 1
    assert report["leakage"]["validation_images_in_training"] == 3
    assert [item["training"][0].split(" (")[0].rsplit("/", 1)[1] for item in report["leakage"]["images"]] == \
        [f"t{i}.png" for i in LEAKED]


def test_the_text_report_shows_ten_examples_and_the_json_all(problem_set, tmp_path, capsys):
    _without_bad_label(problem_set)
    out = tmp_path / "report"
    same = problem_set / "train.txt"
    result = run_main(check_data.main, _args(problem_set, validation_data_path=same, output_dir=out), capsys)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("leakage: 25 of 25 validation images are also training images (same bytes)")
    assert lines[start + check_data.EXAMPLES + 1] == "  ... and 15 more (report.json lists every one)"
    assert len(json.loads((out / "report.json").read_text())["leakage"]["images"]) == 25


@pytest.mark.parametrize("kind", ["folder", "list", "tfrecords"])
def test_every_source_format(kind, tmp_path, capsys):
    """Validation written with the training seed starts with the same two class-0 images: leakage of 2."""
    write = {"folder": write_folder, "list": write_list, "tfrecords": lambda root, **kw: write_tfrecords(root, shards=1, **kw)}[kind]
    train = write(tmp_path / "train", per_class=4, num_classes=2, seed=0)
    val = write(tmp_path / "val", per_class=2, num_classes=2, seed=0)
    out = tmp_path / "report"
    flags = [f"--training_data_path={train}", f"--validation_data_path={val}", "--num_classes=2", f"--output_dir={out}"]
    result = run_main(check_data.main, flags, capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert [row["images"] for row in report["sets"]["training"]["images_per_class"]] == [4, 4]
    assert report["sets"]["training"]["image_sizes"]["commonest"] == [{"size": "24x20", "images": 8}]
    leaked = [item["validation"] for item in report["leakage"]["images"]]
    expected = {"folder": ["class_0/img0.png", "class_0/img1.png"], "list": ["img/0_0.jpg (line 1", "img/0_1.jpg (line 2"],
                "tfrecords": ["data-0.tfrecord record 0", "data-0.tfrecord record 1"]}[kind]
    assert len(leaked) == 2 and all(fragment in location for fragment, location in zip(expected, leaked)), leaked
    assert "warning: leakage: 2 of 4 validation images" in result.stdout


def test_the_check_keeps_the_images_the_trainers_scan_keeps(tmp_path):
    from trainer import data, sources

    rng = np.random.default_rng(0)
    good = [_image(i % 2, rng) for i in range(6)]
    jpeg = encode(tiny_image(1, rng, size=16)[:, :16], "JPEG")
    images = good + [b"\x89PNG\r\n\x1a\n broken", jpeg, jpeg[:60], b"", b"GIF89a"]
    train = write_tfrecords(tmp_path / "train", labels=[i % 2 for i in range(len(images))], images=images, shards=2)
    source = sources.open_source(train, "training_data_path")
    kept = np.concatenate([keys for keys, *_ in data.record_details(source, sources.RecordFormat(), batch_size=4)])
    assert sorted(kept) == sorted(data.scan(source, 2, sources.RecordFormat(), 1.0).keys)
    assert len(kept) == 7


@pytest.mark.parametrize("encoded, reason", [
    (b"", "empty (0 bytes)"),
    (b"<html>Not Found</html>", "not an image format TensorFlow decodes (JPEG, PNG, GIF, BMP, WebP); it starts with "
                                "b'<html>Not Fo'"),
    (b"\x89PNG\r\n\x1a\n broken", "truncated PNG: it ends before its IEND chunk (Invalid PNG. Failed to initialize "
                                 "decoder.)"),
    (b"\xff\xd8\xff\xe0 garbage \xff\xd9", "JPEG that does not decode: jpeg::Uncompress failed. Invalid JPEG data or "
                                          "crop window."),
])
def test_reasons_for_unreadable_images(encoded, reason):
    assert check_data.unreadable_reason(encoded) == reason


def test_a_truncated_image_of_each_format_is_named_truncated():
    pixels = tiny_image(0, np.random.default_rng(0), size=16)
    for fmt, kind in (("JPEG", "JPEG"), ("PNG", "PNG"), ("GIF", "GIF"), ("BMP", "BMP")):
        encoded = encode(pixels, fmt)
        assert check_data.unreadable_reason(encoded[: len(encoded) * 2 // 3]).startswith(f"truncated {kind}: "), fmt


def test_help(capsys):
    result = run_main(check_data.main, ["--help"], capsys)
    assert_tool_help(result, "trainer.check_data", ("data", "outputs"), "training_data_path", 0.01)
    for name in check_data.DATA_FLAGS + ("output_dir",):
        assert f"--{name}=" in result.stdout
    assert "--validation_data_path=TEXT\n" in result.stdout  # optional here


def test_flags_are_checked_as_the_trainer_checks_them(capsys):
    assert_user_error(run_main(check_data.main, ["--num_classes=2"], capsys), "--training_data_path is required")
    result = run_main(check_data.main, ["--training_data_path=x", "--num_classes=1"], capsys)
    assert_user_error(result, "--num_classes must be at least 2")
    result = run_main(check_data.main, ["--training_data_path=x", "--num_classes=2", "--task=detection"], capsys)
    assert_user_error(result, "--task must be one of")


def test_metric_learning_validation_ids_of_unseen_classes_are_data(tmp_path, capsys):
    """For --task=metric_learning the check accepts what the trainer accepts: validation ids outside the
    training classes (an open set); the training labels are still checked."""
    rng = np.random.default_rng(4)
    for name, labels in (("train.txt", (0, 1)), ("val.txt", (0, 7))):
        lines = []
        for label in labels:
            for i in range(3):
                path = tmp_path / f"{name[:-4]}_{label}_{i}.png"
                path.write_bytes(encode(tiny_image(label, rng), "PNG"))
                lines.append(f"{path.name} {label}\n")
        (tmp_path / name).write_text("".join(lines))
    assert run_main(check_data.main, _args(tmp_path, task="metric_learning"), capsys).returncode == 0
    assert_user_error(run_main(check_data.main, _args(tmp_path), capsys), "label 7", "outside [0, 2)")
