"""Shared test helpers: tiny image sets in each source format, and running the CLI."""

import io
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_image(label, rng, size=20):
    """A learnable picture: class 0 has a dark left half, class 1 a dark right half, others stripes."""
    pixels = rng.integers(150, 255, size=(size, size + 4, 3), dtype=np.uint8)
    if label == 0:
        pixels[:, : size // 2] //= 4
    elif label == 1:
        pixels[:, size // 2 :] //= 4
    else:
        pixels[label % size :: 3] //= 4
    return pixels


def encode(pixels, fmt, mode=None):
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_folder(root, per_class=8, num_classes=2, seed=0, fmt="PNG"):
    rng = np.random.default_rng(seed)
    for label in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{label}"), exist_ok=True)
        for i in range(per_class):
            with open(os.path.join(root, f"class_{label}", f"img{i}.{fmt.lower()}"), "wb") as f:
                f.write(encode(tiny_image(label, rng), fmt))
    return str(root)


def write_list(root, per_class=8, num_classes=2, seed=0, name="images.txt", offset=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    lines = []
    for label in range(num_classes):
        for i in range(per_class):
            rel = f"img/{label}_{i}.jpg"
            with open(os.path.join(root, rel), "wb") as f:
                f.write(encode(tiny_image(label, rng), "JPEG"))
            lines.append(f"{rel} {label + offset}\n")
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def write_tfrecords(root, per_class=8, num_classes=2, seed=0, shards=2, labels=None, image_key="image/encoded",
                    label_key="image/class/label", images=None):
    """TFRecord shards of tf.Examples; `labels`/`images` override the generated ones."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    labels = labels if labels is not None else [c for c in range(num_classes) for _ in range(per_class)]
    images = images if images is not None else [encode(tiny_image(label, rng), "PNG") for label in labels]
    writers = [tf.io.TFRecordWriter(os.path.join(root, f"data-{i}.tfrecord")) for i in range(shards)]
    for i, (image, label) in enumerate(zip(images, labels)):
        feature = {
            image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
            label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        }
        writers[i % shards].write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    for w in writers:
        w.close()
    return os.path.join(root, "data-*.tfrecord")


def tiny_flags(train, val, job_dir, **overrides):
    flags = dict(
        training_data_path=train, validation_data_path=val, job_dir=job_dir, num_classes=2,
        model_type="resnet-18", image_size=16, max_steps=4, eval_frequency=2, train_batch_size=8,
        eval_batch_size=8, initial_learning_rate=0.01, optimizer_type="adam", log_frequency=2,
    )
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def run_cli(module, args, env=None, timeout=600):
    """Runs `python -m module args` as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)


def run_on_jax_devices(code, devices, timeout=300):
    """Runs a Python script on the JAX backend with `devices` XLA CPU devices; the JSON its last line prints."""
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="jax", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def run_main(main, argv, capsys):
    """Runs an entry point's main(argv) in this process, as its command would; returns a CompletedProcess.

    For behaviour that does not depend on being a fresh process (flag checks,
    data errors, a tiny run): it saves the 5 s a new process spends importing TensorFlow.
    """
    capsys.readouterr()
    try:
        main(["prog", *map(str, argv)])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@pytest.fixture
def trainer_main(capsys, monkeypatch, tmp_path):
    """trainer.task's main in this process: trainer_main(args, hypertune_file=None, env=None) -> CompletedProcess."""
    from trainer import task

    def run(args, hypertune_file=None, env=None):
        monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(hypertune_file or tmp_path / "unused.metrics"))
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        task.FLAGS.unparse_flags()  # absl keeps values between parses
        return run_main(task.main, args, capsys)

    return run


def run_trainer(args, hypertune_file=None, env=None):
    env = dict(env or {})
    if hypertune_file:
        env["CLOUD_ML_HP_METRIC_FILE"] = str(hypertune_file)
    return run_cli("trainer.task", args, env=env)


def assert_user_error(result, *fragments):
    """Non-zero exit, no traceback, and one `error:` line naming what was wrong."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_tool_help(result, module, groups, required, default):
    """--help reads like a tool's: usage, an example, the flags under their groups in order, required ones marked."""
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module}")
    assert f"example:\n  python -m {module} " in result.stdout
    lines = result.stdout.splitlines()
    assert [f"{g}:" for g in groups if f"{g}:" in lines] == [f"{g}:" for g in groups]
    assert required is None or f"--{required}=TEXT    [required]" in result.stdout
    assert f"(default {default})" in result.stdout


EXPORTED_CLASS_NAMES = ["cat", "dog", "bird"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A SavedModel exported from an untrained 3-class ResNet-18 at 16x16 (no training: fast)."""
    from trainer import export, models

    root = tmp_path_factory.mktemp("model")
    weights = str(root / "w.weights.h5")
    models.build_model("resnet-18", 3, 16).save_weights(weights)
    export.export_saved_model(weights, "resnet-18", "classification", 3, 16, EXPORTED_CLASS_NAMES, str(root / "model"))
    return str(root / "model")


# Modules whose tests start trainer processes or train for long; run first so that, over
# `pytest -n 2`, the short tests fill the gaps at the end instead of one long test running alone.
_LONG_FIRST = ("test_end_to_end", "test_container_contracts", "test_distributed", "test_hptuning_trainer", "test_multi_label",
               "test_recipes", "test_reliability")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        return _LONG_FIRST.index(module) if module in _LONG_FIRST else len(_LONG_FIRST)

    items.sort(key=rank)


def pytest_sessionfinish(session, exitstatus):
    """A green run leaves nothing in the temporary folder (pytest.ini keeps only failed tests' folders,
    this removes the module and session fixtures' ones too)."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if exitstatus == 0 and factory is not None and factory._basetemp is not None:
        shutil.rmtree(factory._basetemp, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _no_shared_hypertune_file(tmp_path_factory):
    """Runs that name no metrics file write into this session's temporary folder, not /tmp/hypertune."""
    os.environ["CLOUD_ML_HP_METRIC_FILE"] = str(tmp_path_factory.mktemp("hypertune") / "output.metrics")


@pytest.fixture
def hypertune_file(tmp_path):
    return tmp_path / "hypertune" / "output.metrics"
