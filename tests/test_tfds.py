"""TensorFlow Datasets as a data source: a dataset prepared offline (built here from arrays, as
`tfds build` would leave it), read by name with no download; and the errors a user meets."""

import numpy as np
import pytest

from tests.conftest import assert_user_error, tiny_image

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import tensorflow as tf

    root = str(tmp_path_factory.mktemp("tfds"))
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 16)
    pixels = np.stack([tiny_image(int(label), rng, size=16)[:, :16] for label in labels])
    ds = tf.data.Dataset.from_tensor_slices({"image": pixels, "label": labels})
    tfds.dataset_builders.TfDataBuilder(
        name="tiny_halves", config="dark", version="1.0.0", data_dir=root,
        split_datasets={"train": ds, "test": ds.take(8)},
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(16, 16, 3)),
                                             "label": tfds.features.ClassLabel(names=["left", "right"])}),
    ).download_and_prepare()
    return root


def test_a_prepared_tfds_dataset_trains_with_its_class_names(tmp_path, data_dir, trainer_main):
    from tests.conftest import tiny_flags

    job_dir = tmp_path / "run"
    result = trainer_main(tiny_flags("tfds:tiny_halves/dark:1.0.0/train", "tfds:tiny_halves/dark/test", str(job_dir),
                                     tfds_data_dir=data_dir, max_steps=2, eval_frequency=2))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "32 training images, 8 validation images" in result.stdout
    assert (job_dir / "labels.txt").read_text() == "left\nright\n"


@pytest.mark.parametrize("path, message", [
    ("tfds:mnist/train", "mnist is not prepared in"),
    ("tfds:tiny_halves/dark/validation", "has no split 'validation'; it has test, train"),
    ("tfds:no_such_dataset_here/train", "no_such_dataset_here is not prepared in"),
    ("tfds:train", "expected tfds:NAME[/CONFIG][:VERSION]/SPLIT"),
])
def test_tfds_mistakes_are_one_line(tmp_path, data_dir, trainer_main, path, message):
    from tests.conftest import tiny_flags

    result = trainer_main(tiny_flags(path, path, str(tmp_path / "run"), tfds_data_dir=data_dir))
    error = assert_user_error(result, message)
    if "not prepared" in message:
        assert "tfds build" in error and f"--tfds_data_dir={data_dir}" in error


def test_num_classes_must_match_the_datasets_class_label(tmp_path, data_dir, trainer_main):
    from tests.conftest import tiny_flags

    result = trainer_main(tiny_flags("tfds:tiny_halves/dark/train", "tfds:tiny_halves/dark/test", str(tmp_path / "run"),
                                     tfds_data_dir=data_dir, num_classes=3))
    assert_user_error(result, "--num_classes=3 but --training_data_path's dataset has 2 classes")
