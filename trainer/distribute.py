"""Data-parallel training on several devices and hosts, from the cluster environment.

The cluster comes from TF_CONFIG (TensorFlow's convention) or CLUSTER_SPEC
(Vertex AI's), whichever is set; with neither, this process is the whole
cluster. Each backend's own engine does the work:
  * JAX: keras.distribution (initialize() for several processes, then
    DataParallel over every device);
  * TensorFlow: MirroredStrategy for several local GPUs. Several hosts need
    JAX: Keras 3's fit does not run under MultiWorkerMirroredStrategy
    (keras-team/keras#20585), so that case is refused with a clear error.
--train_batch_size stays the global batch. Only the chief (process 0) writes
checkpoints, metrics and the export.
"""

import contextlib
import dataclasses
import json
import os

from trainer.config import UserError


@dataclasses.dataclass(frozen=True)
class Cluster:
    addresses: tuple  # host:port of every process, chief first
    index: int  # this process's position in addresses

    @property
    def is_chief(self):
        return self.index == 0


def cluster_from_env(env=os.environ):
    """Reads TF_CONFIG or CLUSTER_SPEC; a lone process when neither names a cluster."""
    raw, source = env.get("TF_CONFIG") or env.get("CLUSTER_SPEC"), "TF_CONFIG" if env.get("TF_CONFIG") else "CLUSTER_SPEC"
    if not raw:
        return Cluster((), 0)
    try:
        spec = json.loads(raw)
        cluster, task = spec.get("cluster", {}), spec.get("task", {})
        # Chief first, then workers: TF's "chief"/"worker" and Vertex's "workerpool0"/"workerpool1".
        roles = [r for r in ("chief", "master", "workerpool0", "worker", "workerpool1") if r in cluster]
        addresses = tuple(address for role in roles for address in cluster[role])
        role, index = task.get("type", roles[0] if roles else "worker"), int(task.get("index", 0))
        offset = sum(len(cluster[r]) for r in roles[: roles.index(role)])
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise UserError(f"{source} is not a valid cluster spec ({e}); expected JSON with 'cluster' and 'task'") from None
    if not addresses:
        return Cluster((), 0)
    return Cluster(addresses, offset + index)


def setup(backend, cluster):
    """Starts the backend's distribution; returns (the context to build and compile the model in,
    the number of devices a batch is split over)."""
    if backend == "jax":
        return _setup_jax(cluster)
    return _setup_tensorflow(cluster)


def _setup_jax(cluster):
    import keras

    if len(cluster.addresses) > 1:
        keras.distribution.initialize(",".join(cluster.addresses), len(cluster.addresses), cluster.index)
    devices = keras.distribution.list_devices()
    if len(devices) > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        print(f"data parallel over {len(devices)} devices in {max(len(cluster.addresses), 1)} process(es) (keras.distribution)", flush=True)
    return contextlib.nullcontext(), len(devices)


def _setup_tensorflow(cluster):
    import tensorflow as tf

    if len(cluster.addresses) > 1:
        # keras-team/keras#20585: Keras 3's fit does not run under MultiWorkerMirroredStrategy.
        raise UserError("--backend=tensorflow trains on one host only (Keras 3 fit does not support "
                        "MultiWorkerMirroredStrategy); use --backend=jax for several hosts")
    devices = _mirrored_devices(tf)
    if len(devices) > 1:
        strategy = tf.distribute.MirroredStrategy(devices)
        print(f"data parallel over {strategy.num_replicas_in_sync} devices (MirroredStrategy)", flush=True)
        return strategy.scope(), strategy.num_replicas_in_sync
    return contextlib.nullcontext(), 1


def _mirrored_devices(tf):
    """This host's GPUs: MirroredStrategy copies the model to each when there are several."""
    return [f"/gpu:{i}" for i in range(len(tf.config.list_physical_devices("GPU")))]
