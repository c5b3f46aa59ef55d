"""Each worker reads only its share of every global batch, and the shares, in worker order, are the
one-process batch: built in this process (both source kinds, the sampler, loss weights, a resume),
in two worker processes that find their place in TF_CONFIG, and trained on by two workers (either
backend) whose losses are a one-process run's. Mixing stays within each worker's share."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import ROOT, tiny_flags, write_folder, write_tfrecords
from tests.test_distributed import cluster_env, free_ports, start_trainer
from trainer import data, sources
from trainer.tasks import CLASSIFICATION

FMT = sources.RecordFormat()
BATCH = 8  # the global batch


def batches(path, num_classes, count, start_step=0, **options):
    """The first `count` training batches from start_step on, as numpy tuples (one process unless
    options name a worker)."""
    tf.random.set_seed(1)  # the trainer sets it (its --seed) before building the data: the shuffle depends on it
    source = sources.open_source(path, "training_data_path")
    scan = data.scan(source, num_classes, FMT, 0.0)
    ds = data.training_dataset(source, scan, FMT, CLASSIFICATION.target, BATCH, 16, num_classes, 5, 0.3, True,
                               start_step, **options)
    return list(ds.take(count).as_numpy_iterator())


def assert_side_by_side(parts, whole):
    """Per step, the workers' batches concatenated in worker order equal the one-process batch, part by part."""
    assert len(whole) and all(len(p) == len(whole) for p in parts)
    for step, batch in enumerate(whole):
        for i, column in enumerate(batch):
            np.testing.assert_array_equal(np.concatenate([p[step][i] for p in parts]), column)


# Both sources hold 18 images of class 0 and 6 of class 1: the sampler leaves images out, weights differ.

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("folder"), per_class=18)
    for i in range(6, 18):
        os.remove(os.path.join(root, "class_1", f"img{i}.png"))
    return root


@pytest.fixture(scope="module")
def tfrecords(tmp_path_factory):
    return write_tfrecords(tmp_path_factory.mktemp("tfrecords"), labels=[0] * 18 + [1] * 6)


@pytest.mark.parametrize("kind, workers, options", [
    ("folder", 2, {}),
    ("tfrecords", 4, {}),
    ("folder", 2, {"class_balancing": "sampler"}),
    ("tfrecords", 2, {"class_balancing": "sampler"}),
    ("folder", 2, {"class_balancing": "weights", "augmentation": "randaugment"}),
], ids=["folder", "tfrecords-4-workers", "folder-sampler", "tfrecords-sampler", "folder-weights-randaugment"])
@pytest.mark.parametrize("start_step", [0, 3])  # 3: a resume, which skips what steps 0-2 consumed
def test_workers_batches_side_by_side_are_the_one_process_batch(request, kind, workers, options, start_step):
    path = request.getfixturevalue(kind)
    whole = batches(path, 2, 3, start_step, **options)
    parts = [batches(path, 2, 3, start_step, worker=i, workers=workers, **options) for i in range(workers)]
    assert parts[0][0][0].shape == (BATCH // workers, 16, 16, 3)
    assert_side_by_side(parts, whole)


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory):
    """16 images, each its own class: a target names its image, and a mixed target both images."""
    return write_folder(tmp_path_factory.mktemp("one_per_class"), per_class=1, num_classes=16)


def test_a_worker_never_opens_the_files_of_another_workers_share(one_per_class, tmp_path):
    path = shutil.copytree(one_per_class, tmp_path / "copy")
    source = sources.open_source(str(path), "training_data_path")
    scan = data.scan(source, 16, FMT, 0.0)  # before any file goes

    def worker_batches(worker, workers, count=2):  # 2 steps of 8: the first pass over the 16 images
        ds = data.training_dataset(source, scan, FMT, CLASSIFICATION.target, BATCH, 16, 16, 5, 0.3, True,
                                   worker=worker, workers=workers)
        return list(ds.take(count).as_numpy_iterator())

    whole = worker_batches(0, 1)
    file_of = {ids[0]: name for name, ids in zip(source.files, source.labels)}
    for _, targets in whole:  # worker 1's rows: its images are removed
        for label in targets[BATCH // 2:].argmax(axis=1):
            os.remove(file_of[label])
    first = worker_batches(0, 2)
    assert_side_by_side([first], [(images[: BATCH // 2], targets[: BATCH // 2]) for images, targets in whole])
    with pytest.raises(tf.errors.NotFoundError):
        worker_batches(1, 2)


def test_mixing_pairs_images_within_each_workers_share_and_resumes_exactly(one_per_class):
    mixing = {"mixup_alpha": 1.0, "cutmix_alpha": 1.0}  # both: MixUp on even steps, CutMix on odd ones
    plain = [batches(one_per_class, 16, 4, worker=i, workers=2) for i in range(2)]
    mixed = [batches(one_per_class, 16, 4, worker=i, workers=2, **mixing) for i in range(2)]
    for worker in range(2):
        for (_, own), (_, targets) in zip(plain[worker], mixed[worker]):
            partners = set(np.flatnonzero(targets.sum(axis=0)))
            assert partners <= set(own.argmax(axis=1))  # every partner is one of this worker's images
        resumed = batches(one_per_class, 16, 2, 2, worker=worker, workers=2, **mixing)
        assert_side_by_side([resumed], mixed[worker][2:])
    # Each worker draws its own mixing weights: the share of each image's own class differs.
    own_share = [np.sort(np.max(targets, axis=1)) for _, targets in (mixed[0][0], mixed[1][0])]
    assert not np.allclose(*own_share)


SAVE_SHARE = """
import sys
import numpy as np
import tensorflow as tf
from trainer import data, sources
from trainer.cluster import cluster_from_env
from trainer.tasks import CLASSIFICATION
path, start_step, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cluster = cluster_from_env()
tf.random.set_seed(1)
source = sources.open_source(path, "training_data_path")
scan = data.scan(source, 2, sources.RecordFormat(), 0.0)
ds = data.training_dataset(source, scan, sources.RecordFormat(), CLASSIFICATION.target, 8, 16, 2, 5, 0.3, True,
                           start_step, worker=cluster.index, workers=cluster.size)
images, targets = zip(*ds.take(3).as_numpy_iterator())
np.savez(out, images=np.stack(images), targets=np.stack(targets))
"""


def test_two_worker_processes_read_the_shares_of_the_one_process_batch(folder, tmp_path):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]  # no collectives start: only the places matter
    env = dict(os.environ, PYTHONPATH=ROOT)
    processes = [subprocess.Popen([sys.executable, "-c", SAVE_SHARE, folder, "2", str(tmp_path / f"{i}.npz")],
                                  env={**env, **cluster_env(workers, i, tmp_path)}, cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    shares = [np.load(tmp_path / f"{i}.npz") for i in range(2)]
    parts = [list(zip(share["images"], share["targets"])) for share in shares]
    assert_side_by_side(parts, batches(folder, 2, 3, 2))


def progress_losses(output):
    """(data loss, weight-decay term) of every progress line, in step order."""
    lines = [line for line in output.splitlines() if line.startswith("step")]
    return [[float(part.split()[0]) for part in line.split("loss")[1].split("+ weight decay")] for line in lines]


@pytest.mark.parametrize("backend, engine", [
    pytest.param("jax", "keras.distribution", marks=pytest.mark.slow),  # two JAX processes, each compiling
    ("tensorflow", "MultiWorkerMirroredStrategy"),
])
def test_two_workers_train_as_one_process_does(folder, tmp_path, backend, engine):
    # Each step's loss over the global batch, and the update from its gradient, are one process's (to the
    # printed digits) only if each worker's engine takes its share as its part of that batch. A ViT (layer
    # norm: no statistics across images) and SGD (Adam's first steps turn rounding into whole steps) keep
    # the two runs' arithmetic alike. Compared: the progress line's data loss and weight-decay term (Keras
    # divides a loss computed per replica by the replica count; the data_loss metric multiplies it back).
    if backend == "jax":
        pytest.importorskip("jax")

    def flags(job):
        return tiny_flags(folder, folder, str(tmp_path / job), backend=backend, model_type="vit-tiny",
                          optimizer_type="momentum", log_frequency=1, max_steps=3, eval_frequency=3)

    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    processes = [start_trainer(flags("two"), cluster_env(workers, i, tmp_path)) for i in range(2)]
    processes.append(start_trainer(flags("one"), {"CLOUD_ML_HP_METRIC_FILE": str(tmp_path / "hypertune-one")}))
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    assert f"data parallel over 2 devices in 2 process(es) ({engine})" in outputs[0][0]
    two, one = progress_losses(outputs[0][0]), progress_losses(outputs[2][0])
    assert len(one) == 3
    np.testing.assert_allclose(two, one, atol=3e-4)
