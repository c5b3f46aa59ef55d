"""Data-parallel wiring on CPU: cluster specs, two worker processes, and JAX over two devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_on_jax_devices, tiny_flags, write_tfrecords
from trainer.cli import UserError
from trainer.cluster import Cluster, cluster_from_env


@pytest.mark.parametrize("env, expected", [
    ({}, Cluster((), 0)),
    ({"TF_CONFIG": "{}"}, Cluster((), 0)),
    ({"TF_CONFIG": json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]}, "task": {"type": "worker", "index": 1}})},
     Cluster(("a:1", "b:2", "c:3"), 2)),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}})},
     Cluster(("a:1", "b:2"), 0)),
    ({"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["a:1"], "workerpool1": ["b:2"]},
                                  "task": {"type": "workerpool1", "index": 0}})},
     Cluster(("a:1", "b:2"), 1)),
])
def test_cluster_from_environment(env, expected):
    got = cluster_from_env(env)
    assert got == expected
    assert got.is_chief == (expected.index == 0)


@pytest.mark.parametrize("raw", [
    "{not json",
    json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 5}}),
    json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}),
])
def test_malformed_cluster_spec_names_the_variable(raw):
    with pytest.raises(UserError, match="TF_CONFIG is not a valid cluster spec"):
        cluster_from_env({"TF_CONFIG": raw})


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_trainer(args, env):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=full_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cluster_env(workers, index, tmp_path):
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    return {"TF_CONFIG": json.dumps(tf_config), "CLOUD_ML_HP_METRIC_FILE": str(tmp_path / f"hypertune-{index}")}


@pytest.mark.parametrize("backend, engine", [
    pytest.param("jax", "keras.distribution", marks=pytest.mark.slow),  # 40 s: two JAX processes, each compiling
    ("tensorflow", "MultiWorkerMirroredStrategy"),
])
def test_two_processes_train_one_model_and_only_the_chief_writes(tmp_path, backend, engine):
    if backend == "jax":
        pytest.importorskip("jax")
    train = write_tfrecords(tmp_path / "train", per_class=8)
    job = tmp_path / "job"
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    flags = tiny_flags(train, train, str(job), backend=backend, log_frequency=1)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    processes = [start_trainer(flags, {**cluster_env(workers, index, tmp_path), "TMPDIR": str(scratch)})
                 for index in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert f"data parallel over 2 devices in 2 process(es) ({engine})" in out
    assert not list(scratch.glob("worker1-*"))  # the worker's scratch checkpoints are removed
    losses = [[line.split("loss")[1].split()[0] for line in out.splitlines() if line.startswith("step")] for out, _ in outputs]
    assert losses[0] == losses[1] and len(losses[0]) == 4  # one model, one global batch per step
    assert (job / "model" / "saved_model.pb").exists()
    assert [e["step"] for e in json.load(open(job / "metrics.json"))["evaluations"]] == [2, 4]
    assert len(open(tmp_path / "hypertune-0").readlines()) == 2
    assert not (tmp_path / "hypertune-1").exists()
    assert "the chief exports" in outputs[1][0] and "eval at step" not in outputs[1][0]


@pytest.mark.slow  # the same DataParallel as the two-process test, in one process: a GPU host's path
def test_jax_data_parallel_over_two_cpu_devices(tmp_path):
    pytest.importorskip("jax")
    train = write_tfrecords(tmp_path / "train", per_class=8)
    job = tmp_path / "job"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "CLOUD_ML_HP_METRIC_FILE": str(tmp_path / "ht")}
    process = start_trainer(tiny_flags(train, train, str(job), backend="jax"), env)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "data parallel over 2 devices" in out
    assert (job / "model" / "saved_model.pb").exists()


MIRRORED_ON_TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import distribute, task
distribute._mirrored_devices = lambda tf: ["/cpu:0", "/cpu:1"]  # stands in for a host with two GPUs
task.main(["trainer"] + sys.argv[1:])
"""


def test_tensorflow_mirrored_strategy_over_two_devices_trains_resumes_and_exports(tmp_path):
    # No machine here has two GPUs: two logical CPU devices take their place, so
    # the whole MirroredStrategy path (mirrored variables, split batches,
    # checkpoints, evaluation, export) runs as it would on them.
    train = write_tfrecords(tmp_path / "train", per_class=8)
    job = tmp_path / "job"
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="tensorflow", CLOUD_ML_HP_METRIC_FILE=str(tmp_path / "ht"))

    def train_to(max_steps):
        flags = tiny_flags(train, train, str(job), max_steps=max_steps, eval_frequency=2, log_frequency=1)
        return subprocess.run([sys.executable, "-c", MIRRORED_ON_TWO_CPUS, *flags], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)

    first = train_to(2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "data parallel over 2 devices (MirroredStrategy)" in first.stdout
    resumed = train_to(4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at step 2" in resumed.stdout
    assert [e["step"] for e in json.load(open(job / "metrics.json"))["evaluations"]] == [2, 4]
    import tensorflow as tf

    served = tf.saved_model.load(str(job / "model")).signatures["serving_images"]
    probabilities = served(images=tf.zeros([3, 20, 20, 3], tf.uint8))["probabilities"].numpy()
    assert probabilities.shape == (3, 2) and abs(probabilities.sum(axis=1) - 1).max() < 1e-4


PLACED_AHEAD = """
import json
import keras
import numpy as np
import tensorflow as tf
from trainer import distribute

keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
rng = np.random.default_rng(0)
images = rng.normal(size=(48, 6)).astype("float32")
labels = np.eye(3, dtype="float32")[rng.integers(0, 3, 48)]
dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).repeat()


def trained(training_input):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), keras.losses.CategoricalCrossentropy(from_logits=True))
    model.fit(training_input, steps_per_epoch=12, verbose=0)
    return [w.tolist() for w in model.get_weights()]


read = []
def counted(batches):
    for batch in batches:
        read.append(1)
        yield batch


placed = distribute.placed_ahead(counted(dataset.take(5).as_numpy_iterator()), keras.distribution.distribution())
first = next(placed)
print(json.dumps({
    "read_before_the_first": len(read),
    "first_on": sorted(str(s.device) for s in first[0].addressable_shards),
    "first_equal": bool(np.array_equal(np.asarray(first[0]), images[:8])),
    "yielded": 1 + len(list(placed)),
    "keras": trained(dataset),
    "ahead": trained(distribute.training_input(dataset, 8)),
}))
"""


def test_batches_placed_ahead_on_two_devices_train_as_fit_places_them(tmp_path):
    # On JAX over several devices the trainer hands fit its batches already split over the devices,
    # two steps ahead (distribute.placed_ahead): the same batches, in order, so the same weights.
    pytest.importorskip("jax")
    found = run_on_jax_devices(PLACED_AHEAD, 2)
    assert found["read_before_the_first"] == 3  # the first and the two after it are on their way
    assert found["first_on"] == ["cpu:0", "cpu:1"] and found["first_equal"]
    assert found["yielded"] == 5
    assert found["ahead"] == found["keras"]


STEP_INPUTS = """
def step_inputs(model, rng):  # the scripts' imports are there when it is called
    # A training step's inputs on two devices: 8 images split over them, their labels, the loss, the
    # model's trainable and other variables' values.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    images = rng.integers(0, 256, size=(8, 32, 32, 3)).astype("uint8")
    images = jax.device_put(images, NamedSharding(Mesh(jax.devices(), ("batch",)), PartitionSpec("batch")))
    return (images, np.arange(8) % 10, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
"""

PER_DEVICE_BATCH_NORM = """
import json
import os
import tempfile
import jax
import keras
import numpy as np
from trainer import models

keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
model = models.build_model("resnet-18", 10, 32, seed=0)
norms = [layer for layer in models._all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
layer = norms[0]
rng = np.random.default_rng(0)
x = rng.normal(2.0, 3.0, size=(8, 4, 4, layer.moving_mean.shape[0])).astype("float32")
x[4:] = x[4:] * 5 + 7  # the second device's four images differ from the first's
moving = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
normalised = np.asarray(layer(x, training=True))
shares = x.reshape(2, 4, 4, 4, -1)
mean, variance = shares.mean(axis=(1, 2, 3), keepdims=True), shares.var(axis=(1, 2, 3), keepdims=True)
gamma, beta = np.asarray(layer.gamma), np.asarray(layer.beta)
want = ((shares - mean) / np.sqrt(variance + layer.epsilon) * gamma + beta).reshape(x.shape)
m = layer.momentum
want_moving = (moving[0] * m + mean.mean(axis=0).ravel() * (1 - m), moving[1] * m + variance.mean(axis=0).ravel() * (1 - m))
# What a user reads of the moving averages: inference, and the weights file in Keras' layout, which the
# export's model (Keras' own batch norm) loads.
inferred = np.asarray(layer(x, training=False))
want_inferred = (x - want_moving[0]) / np.sqrt(want_moving[1] + layer.epsilon) * gamma + beta
path = os.path.join(tempfile.mkdtemp(), "weights.weights.h5")
model.save_weights(path)
exported = models.build_model("resnet-18", 10, 32, one_pass_moments=False)
exported.load_weights(path)
saved = [layer for layer in models._all_layers(exported) if isinstance(layer, keras.layers.BatchNormalization)][0]
moving_difference = max(float(np.abs(np.asarray(v) - w).max())
                        for v, w in zip((saved.moving_mean, saved.moving_variance), want_moving))

# The compiled training step of the whole model, its batch split over the two devices.
images, labels, loss, trainable, fixed = step_inputs(model, rng)
step = jax.jit(jax.grad(lambda w, x: loss(labels, model.stateless_call(w, fixed, x, training=True)[0])))
compiled = step.lower(trainable, images).compile().as_text()
moved = jax.jit(lambda w, f, x: model.stateless_call(w, f, x, training=True)[1])  # the moving averages' update
moving_update = moved.lower(trainable, fixed, images).compile().as_text()

models.set_synchronized_batch_norm(model)  # --sync_batch_norm: the global batch's statistics
synchronised = np.asarray(layer(x, training=True))
want_global = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + layer.epsilon) * gamma + beta
print(json.dumps({
    "synchronised_difference": float(np.abs(synchronised - want_global).max()),
    "difference": float(np.abs(normalised - want).max()),
    "moving_difference": moving_difference,
    "inferred_difference": float(np.abs(inferred - want_inferred).max()),
    "moving_update_all_reduces": moving_update.count(" all-reduce("),
    "batch_norms": len(norms),
    "all_reduces": compiled.count(" all-reduce("),
    "other_collectives": sum(compiled.count(name) for name in ("all-gather(", "all-to-all(", "collective-permute(")),
}))
"""


KEPT_KERNEL_CASTS = """
import json
import jax
import keras
import numpy as np
from trainer import models

keras.mixed_precision.set_dtype_policy("mixed_bfloat16")  # the step casts every kernel to bfloat16
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
model = models.build_model("resnet-18", 10, 32, seed=0)
convolutions = [layer for layer in models._all_layers(model) if isinstance(layer, keras.layers.Conv2D)]
images, labels, loss, trainable, fixed = step_inputs(model, np.random.default_rng(0))
forward = jax.jit(lambda w, x: model.stateless_call(w, fixed, x, training=True)[0]).lower(trainable, images).as_text()


def gradients():
    step = jax.jit(jax.grad(lambda w, x: loss(labels, model.stateless_call(w, fixed, x, training=True)[0])))
    return [np.asarray(g, "float32") for g in step(trainable, images)]


kept = gradients()
for layer in convolutions:  # Keras' own convolution: the backward pass casts each kernel again
    vars(layer).pop("convolution_op", None)
recast = gradients()
print(json.dumps({
    "keras_convolutions": sum("call" not in vars(layer) for layer in convolutions),  # the stem has its own call
    "kept_casts": forward.count("stablehlo.optimization_barrier"),
    "difference": max(float(np.abs(a - b).max()) for a, b in zip(kept, recast)),
}))
"""


def test_over_several_devices_each_convolution_keeps_its_kernel_cast_for_the_backward_pass():
    # Over two GPUs, a kernel cast recomputed in the backward pass was fused with the optimizer's update of the
    # same kernel, so the backward pass waited at each 1x1 convolution for its gradient's all-reduce
    # (models._kernel_cast_once; ResNet-50 on two H200s went from 94.4% to 96.6% scaling efficiency). The
    # speed shows only on GPUs; here: every convolution keeps its cast, and the gradients are Keras' own to
    # the last bit.
    pytest.importorskip("jax")
    found = run_on_jax_devices(STEP_INPUTS + KEPT_KERNEL_CASTS, 2)
    assert found["keras_convolutions"] > 0 and found["kept_casts"] == found["keras_convolutions"]
    assert found["difference"] == 0.0


def test_each_device_normalises_its_own_share_and_the_step_syncs_only_the_gradients():
    # As PyTorch DDP and TensorFlow's MirroredStrategy do. Under keras.distribution one jitted step sees
    # the global batch, and Keras' batch norm would cross devices for every layer's statistics, forward
    # and backward (35 all-reduces in this step, each waited for before the next layer), where the
    # gradients alone need one.
    pytest.importorskip("jax")
    found = run_on_jax_devices(STEP_INPUTS + PER_DEVICE_BATCH_NORM, 2)
    assert found["difference"] < 1e-4
    # The moving averages take the mean of the two devices' statistics, as inference and the saved weights
    # read them; each device moves its own, so updating them needs no all-reduce.
    assert found["moving_difference"] < 1e-4 and found["inferred_difference"] < 1e-4
    assert found["moving_update_all_reduces"] == 0
    assert found["all_reduces"] < found["batch_norms"] and found["other_collectives"] == 0
    assert found["synchronised_difference"] < 1e-4  # --sync_batch_norm asks for the global batch's statistics
