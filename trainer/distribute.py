"""Data-parallel training on several devices and hosts, from the cluster environment.

The cluster comes from TF_CONFIG (TensorFlow's convention) or CLUSTER_SPEC
(Vertex AI's), whichever is set; with neither, this process is the whole
cluster. Each backend's own engine does the work:
  * JAX: keras.distribution (initialize() for several processes, then
    DataParallel over every device);
  * TensorFlow: MirroredStrategy for several local GPUs;
    MultiWorkerMirroredStrategy for several processes (prepare_fit works
    around the two places where Keras 3's fit breaks under it).
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
        if not addresses:
            return Cluster((), 0)  # no cluster named (e.g. TF_CONFIG='{}'): a lone process
        role, index = task.get("type", roles[0]), int(task.get("index", 0))
        if role not in roles or not 0 <= index < len(cluster[role]):
            raise ValueError(f"task {role!r} index {index} is not in the cluster ({', '.join(roles)})")
        offset = sum(len(cluster[r]) for r in roles[: roles.index(role)])
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise UserError(f"{source} is not a valid cluster spec ({e}); expected JSON with 'cluster' and 'task'") from None
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
        # Every process is a "worker", chief first, whichever variable named the cluster.
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": list(cluster.addresses)}), task_type="worker", task_id=cluster.index,
            rpc_layer="grpc")
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        print(f"data parallel over {strategy.num_replicas_in_sync} devices in {len(cluster.addresses)} process(es) "
              "(MultiWorkerMirroredStrategy)", flush=True)
        return strategy.scope(), strategy.num_replicas_in_sync
    devices = _mirrored_devices(tf)
    if len(devices) > 1:
        strategy = tf.distribute.MirroredStrategy(devices)
        print(f"data parallel over {strategy.num_replicas_in_sync} devices (MirroredStrategy)", flush=True)
        return strategy.scope(), strategy.num_replicas_in_sync
    return contextlib.nullcontext(), 1


def prepare_fit(model, batch_spec):
    """Builds the loss and optimizer from the batch's spec before fit, on every backend.

    Built here, fit has no reason to peek at a batch: on JAX that peek made an
    extra iterator of the training data, which moved the reshuffle of every
    later pass, so a resumed run did not see the batches an uninterrupted one did.

    Call it in the strategy's scope, after compile. Under MultiWorkerMirroredStrategy
    Keras 3.15's fit breaks in two more places (keras-team/keras#20585): before the
    first step it averages a real input batch over the workers (a uint8 batch cannot
    be averaged), and after each step it averages the scalar logs along an axis 0
    they do not have. So Keras' own build is skipped there, and the steps return
    their logs with a leading axis of 1 (the logs are already equal on every
    worker; averaging keeps them).
    """
    import keras

    model._symbolic_build(data_batch=batch_spec)
    if keras.config.backend() != "tensorflow":
        return
    import tensorflow as tf

    if not isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return
    model._maybe_symbolic_build = lambda *args, **kwargs: None
    for name in ("train_step", "test_step"):
        step = getattr(model, name)
        setattr(model, name, lambda data, step=step: {key: tf.reshape(value, [1]) for key, value in step(data).items()})


def _mirrored_devices(tf):
    """This host's GPUs: MirroredStrategy copies the model to each when there are several."""
    return [f"/gpu:{i}" for i in range(len(tf.config.list_physical_devices("GPU")))]
