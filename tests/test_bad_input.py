"""Each user mistake: one `error:` line naming the flag or file, non-zero exit, no traceback.

The trainer's main() runs in this process (trainer_main); the one test that
starts a process checks what only a process shows: flags are checked before
TensorFlow is imported.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, assert_tool_help, assert_user_error, encode, tiny_flags, tiny_image, write_folder, write_tfrecords

import numpy as np

BASE = ["--training_data_path=t", "--validation_data_path=v", "--num_classes=3", "--job-dir=/tmp/unused"]


@pytest.mark.parametrize("args, fragment", [
    (["--learning_rat=0.1"], "learning_rat"),
    (["--max_steps=0"], "--max_steps"),
    ([], "--max_steps (or --num_epochs) is required"),
    (["--max_steps=ten"], "--max_steps"),
    (["--max_steps=5", "--model_type=resnet-19"], "--model_type must be one of"),
    (["--max_steps=5", "--optimizer_type=sgd"], "--optimizer_type must be one of momentum, adam, rmsprop"),
    (["--max_steps=5", "--label_smoothing=1.0"], "--label_smoothing must be in [0, 1)"),
    (["--max_steps=5", "--learning_rate_decay_type=linear"], "--learning_rate_decay_type"),
    (["--max_steps=5", "--optimizer_arguments=betta_1=0.8", "--optimizer_type=adam"], "'betta_1' is not an argument of the adam optimizer"),
    (["--max_steps=5", "--optimizer_arguments=momentum"], "--optimizer_arguments"),
    (["--max_steps=500", "--learning_rate_decay_type=stepwise", "--stepwise_learning_rate_steps=100,50"], "strictly increasing"),
    (["--max_steps=500", "--learning_rate_decay_type=stepwise", "--stepwise_learning_rate_levels=0.1"], "one level per step boundary"),
    (["--max_steps=5", "--warmup_steps=5"], "--warmup_steps"),
    (["--max_steps=5", "--image_size=8"], "--image_size"),
    (["--max_steps=5", "--backend=torch"], "--backend must be one of tensorflow, jax"),
    (["--max_steps=5", "extra_positional"], "unexpected argument"),
    (["--max_steps=5", "--training_data_path="], "--training_data_path is required"),
    (["--max_steps=5", "--optimizer_arguments=momentum=abc"], "momentum='abc' should be a number >= 0"),
    (["--max_steps=5", "--optimizer_arguments=momentum=1.5"], "momentum must be below 1"),
    (["--max_steps=5", "--optimizer_arguments=nesterov=1"], "nesterov=1.0 should be true or false"),
    (["--max_steps=5", "--optimizer_arguments=use_ema=true"], "'use_ema' is not an argument"),
    (["--max_steps=5", "--optimizer_arguments=clipnorm=1,clipvalue=1"], "at most one of clipnorm"),
    (["--max_steps=5", "--model_type=efficientnet-b0", "--image_size=16"], "--image_size must be at least 32 for efficientnet-b0"),
    (["--max_steps=5", "--model_type=resnet-50", "--pretrained_checkpoint_path=imagenet"], "efficientnet-* only"),
])
def test_bad_flag_values_are_reported_before_anything_runs(args, fragment, trainer_main):
    assert_user_error(trainer_main(BASE + args), fragment)


def test_flagfile_is_read_and_checked(tmp_path, trainer_main):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--max_steps=5\n--num_classes=1\n")
    assert_user_error(trainer_main(BASE[:2] + ["--job-dir=/tmp/x", f"--flagfile={flagfile}"]), "--num_classes must be at least 2")


@pytest.fixture
def data(tmp_path):
    return write_tfrecords(tmp_path / "train"), write_tfrecords(tmp_path / "val", per_class=2, shards=1)


def test_glob_matching_nothing(tmp_path, data, trainer_main):
    result = trainer_main(tiny_flags(str(tmp_path / "nope-*.tfrecord"), data[1], tmp_path / "job"))
    assert_user_error(result, "--training_data_path", "no files match")


def test_file_that_is_not_a_tfrecord(tmp_path, data, trainer_main):
    bogus = tmp_path / "bogus" / "data-0.tfrecord"
    bogus.parent.mkdir()
    bogus.write_bytes(b"this is a text file, not TFRecords\n" * 10)
    result = trainer_main(tiny_flags(data[0], str(bogus), tmp_path / "job"))
    assert_user_error(result, "--validation_data_path", str(bogus), "not a TFRecord")


def test_label_outside_num_classes_names_file_and_record(tmp_path, data, trainer_main):
    train = write_tfrecords(tmp_path / "bad", labels=[0, 1, 0, 5, 1], shards=1)
    result = trainer_main(tiny_flags(train, data[1], tmp_path / "job"))
    line = assert_user_error(result, "label 5", "data-0.tfrecord record 3", "[0, 2)")
    assert "step" not in result.stdout  # before any training step
    assert line


def test_records_without_the_image_key_name_the_flag(tmp_path, data, trainer_main):
    train = write_tfrecords(tmp_path / "other", image_key="jpeg", shards=1)
    assert_user_error(trainer_main(tiny_flags(train, data[1], tmp_path / "job")), "--image_key")


def test_num_classes_must_match_the_label_map(tmp_path, data, trainer_main):
    label_map = tmp_path / "labels.txt"
    label_map.write_text("a\nb\nc\n")
    result = trainer_main(tiny_flags(*data, tmp_path / "job", label_map_path=label_map))
    assert_user_error(result, "--label_map_path", "3 classes", "--num_classes=2")


def test_num_classes_must_match_the_class_folders(tmp_path, trainer_main):
    train = write_folder(tmp_path / "train", per_class=2, num_classes=3)
    result = trainer_main(tiny_flags(train, train, tmp_path / "job"))
    assert_user_error(result, "--num_classes=2", "3 class subfolders")


def test_unwritable_job_dir(tmp_path, data, trainer_main):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_user_error(trainer_main(tiny_flags(*data, blocker / "job")), "--job-dir", "cannot write")


def corrupt_set(tmp_path, good=16, bad=1):
    folder = write_folder(tmp_path / "train", per_class=good // 2)
    for i in range(bad):
        (tmp_path / "train" / "class_0" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated garbage")
    return folder


def test_corrupt_images_are_skipped_and_counted(tmp_path, hypertune_file, trainer_main):
    train = corrupt_set(tmp_path)
    job = tmp_path / "job"
    result = trainer_main(tiny_flags(train, train, job, max_steps=2, max_corrupt_fraction=0.1), hypertune_file)
    assert result.returncode == 0, result.stderr[-2000:]
    corrupt = json.load(open(job / "metrics.json"))["corrupt_images"]
    assert corrupt["training"] == 1 and corrupt["validation"] == 1
    assert any("broken0.jpg" in example for example in corrupt["examples"])


def test_too_many_corrupt_images_stop_the_run(tmp_path, trainer_main):
    train = corrupt_set(tmp_path, bad=3)
    result = trainer_main(tiny_flags(train, train, tmp_path / "job"))
    assert_user_error(result, "--training_data_path", "3 of 19 images", "broken0.jpg", "--max_corrupt_fraction")
    assert not os.path.exists(tmp_path / "job" / "model")


def test_failure_keeps_earlier_outputs_intact(tmp_path, data, hypertune_file, trainer_main):
    job = tmp_path / "job"
    first = trainer_main(tiny_flags(*data, job, max_steps=2), hypertune_file)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: open(job / p, "rb").read() for p in ("metrics.json", "model/saved_model.pb", "checkpoints/state.json")}
    broken = write_tfrecords(tmp_path / "bad", labels=[0, 9], shards=1)
    assert_user_error(trainer_main(tiny_flags(data[0], broken, job, max_steps=4)), "--validation_data_path", "label 9")
    assert {p: open(job / p, "rb").read() for p in before} == before


def test_corrupt_image_inside_a_tfrecord_is_left_out_and_named(tmp_path):
    from trainer import data, sources
    from trainer.tasks import CLASSIFICATION

    rng = np.random.default_rng(0)
    images = [encode(tiny_image(i % 2, rng), "PNG") for i in range(15)] + [b"\x89PNG\r\n\x1a\n broken"]
    train = write_tfrecords(tmp_path / "train", labels=[i % 2 for i in range(16)], images=images, shards=1)
    source = sources.open_source(train, "training_data_path")
    scan = data.scan(source, 2, sources.RecordFormat(), 0.1)
    assert scan.total == 16 and len(scan.keys) == 15 and scan.corrupt[0].endswith("data-0.tfrecord record 15")
    batches = data.training_dataset(source, scan, sources.RecordFormat(), CLASSIFICATION.target, 15, 16, 2, seed=0,
                                    min_area=1.0, flip=False)
    for images, _ in batches.take(3):  # three passes over the 15 good records: the broken one never comes
        assert images.shape == (15, 16, 16, 3)


def test_help_lists_every_flag(trainer_main):
    result = trainer_main(["--help"])
    assert_tool_help(result, "trainer.task", ("data", "model", "optimisation", "evaluation", "outputs"),
                     "training_data_path", 0.0001)
    from trainer import schema

    for flag in schema.TRAINER_FLAGS:
        assert f"--{flag.name}" in result.stdout
    assert "--training_data_path=TEXT    [required]" in result.stdout
    assert "(default 0.0001)" in result.stdout


def test_every_missing_required_flag_is_named_in_one_line_before_tensorflow_loads():
    probe = ("import sys\nfrom trainer import task\ntry:\n    task.main(['task', '--num_classes=3'])\n"
             "except SystemExit as e:\n    print(e.code, 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k != "AIP_MODEL_DIR"})
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr.strip() == ("error: --training_data_path, --validation_data_path, --max_steps (or "
                                     "--num_epochs), --job-dir are required (see --help)")
