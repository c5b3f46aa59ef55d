"""Data-parallel training on several devices and hosts, from the cluster environment.

The cluster (cluster.py) comes from TF_CONFIG or Vertex AI's CLUSTER_SPEC;
with neither, this process is the whole cluster. Each backend's own engine
does the work:
  * JAX: keras.distribution (initialize() for several processes, then
    DataParallel over every device; or with --classifier_parallelism=model,
    ModelParallel splitting the head's classes over them, margins.py); a TPU
    VM's chips are devices like any other;
  * TensorFlow: MirroredStrategy for several local GPUs;
    MultiWorkerMirroredStrategy for several processes (prepare_fit works
    around the two places where Keras 3's fit breaks under it); TPUStrategy
    when --tpu or $TPU_NAME names a TPU.
--train_batch_size stays the global batch. With several processes each reads
only its share of every batch (data.training_dataset) and hands it to its
engine as its part of the global batch. Only the chief (process 0) writes
checkpoints, metrics and the export.
"""

import contextlib
import os

from trainer import cli


def setup(backend, cluster, classifier_parallelism="data", num_classes=None, tpu=""):
    """Starts the backend's distribution; returns (the context to build and compile the model in,
    the number of devices a batch is split over).

    classifier_parallelism="model" (JAX only; config.py refuses it on TensorFlow): the head's class
    weights are split over every device (margins.model_parallel), the rest stays data parallel.
    tpu (TensorFlow only; "" = $TPU_NAME, if set): the TPU that TPUStrategy runs on.
    """
    if backend == "jax":
        if tpu:
            raise cli.UserError("--tpu is for --backend=tensorflow (TPUStrategy); on JAX a TPU VM's chips are "
                                "found as devices: leave --tpu out")
        return _setup_jax(cluster, classifier_parallelism, num_classes)
    tpu = tpu or os.environ.get("TPU_NAME", "")
    if tpu:
        return _setup_tpu(cluster, tpu)
    return _setup_tensorflow(cluster)


def _setup_jax(cluster, classifier_parallelism, num_classes):
    import keras

    if len(cluster.addresses) > 1:
        keras.distribution.initialize(",".join(cluster.addresses), len(cluster.addresses), cluster.index)
    devices = keras.distribution.list_devices()
    if classifier_parallelism == "model" and len(devices) > 1:  # one device holds the whole head anyway
        from trainer import margins

        if num_classes % len(devices):
            raise cli.UserError(f"--num_classes={num_classes} must be a multiple of the {len(devices)} devices the "
                                "head is split over (--classifier_parallelism=model)")
        distribution = margins.model_parallel(devices)
        distribution.auto_shard_dataset = False  # each process's dataset is its share already
        keras.distribution.set_distribution(distribution)
        cli.say(f"head split by class over {len(devices)} devices in {cluster.size} process(es), the rest data "
                "parallel (keras.distribution.ModelParallel)")
        return contextlib.nullcontext(), len(devices)
    if len(devices) > 1:
        # auto_shard_dataset=False: each process's dataset is its share of the global batch already.
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
        cli.say(f"data parallel over {len(devices)} devices in {cluster.size} process(es) (keras.distribution)")
    return contextlib.nullcontext(), len(devices)


def _setup_tensorflow(cluster):
    import tensorflow as tf

    if len(cluster.addresses) > 1:
        # Every process is a "worker", chief first, whichever variable named the cluster.
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": list(cluster.addresses)}), task_type="worker", task_id=cluster.index,
            rpc_layer="grpc")
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        cli.say(f"data parallel over {strategy.num_replicas_in_sync} devices in {cluster.size} process(es) "
                "(MultiWorkerMirroredStrategy)")
        return strategy.scope(), strategy.num_replicas_in_sync
    devices = _mirrored_devices(tf)
    if len(devices) > 1:
        strategy = tf.distribute.MirroredStrategy(devices)
        cli.say(f"data parallel over {strategy.num_replicas_in_sync} devices (MirroredStrategy)")
        return strategy.scope(), strategy.num_replicas_in_sync
    return contextlib.nullcontext(), 1


def tpu_cluster_resolver(name):
    """TensorFlow's resolver for the TPU called name ('local' on a TPU VM); tests replace it."""
    import tensorflow as tf

    return tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)


def _setup_tpu(cluster, name):
    import tensorflow as tf

    if len(cluster.addresses) > 1:
        raise cli.UserError(f"--tpu / $TPU_NAME={name}: TPUStrategy drives the whole TPU from one trainer process; "
                            "start one, without a TF_CONFIG or CLUSTER_SPEC naming several")
    try:
        resolver = tpu_cluster_resolver(name)
    except (ValueError, RuntimeError, OSError) as e:
        reason = " ".join(str(e).split())  # one line
        raise cli.UserError(f"--tpu / $TPU_NAME={name}: no such TPU can be reached ({reason}); name a TPU of this "
                            "project and zone, or 'local' on a TPU VM") from None
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    strategy = tf.distribute.TPUStrategy(resolver)
    cli.say(f"data parallel over {strategy.num_replicas_in_sync} TPU cores of {name} (TPUStrategy)")
    return strategy.scope(), strategy.num_replicas_in_sync


def training_input(dataset, batch_size):
    """What fit trains on: the training dataset; on JAX over several devices of one process its
    batches already placed on them, a few steps ahead (placed_ahead); under MultiWorkerMirroredStrategy this worker's
    share of every global batch of batch_size images, handed to the strategy as this worker's input
    (distribute_datasets_from_function) and split into its local replicas' batches. Call it in the
    strategy's scope.

    (Handed to fit as a plain dataset, the share would be taken for the global batch and split over
    every worker's replicas again.)
    """
    import keras

    if keras.config.backend() == "jax":
        import jax

        distribution = keras.distribution.distribution()
        if distribution is None or jax.process_count() > 1:  # several processes: fit assembles the global batch
            return dataset
        return placed_ahead(dataset.as_numpy_iterator(), distribution)
    if keras.config.backend() != "tensorflow":
        return dataset
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return dataset
    return strategy.distribute_datasets_from_function(
        lambda context: dataset.rebatch(context.get_per_replica_batch_size(batch_size), drop_remainder=True))


def placed_ahead(batches, distribution, depth=2):
    """Yields each host batch as global arrays split over the distribution's devices, the copies
    to the devices started depth batches before fit takes them.

    Keras' fit places a batch on one device one step ahead, but under a distribution it places each
    batch only when the step asks for it: the step then waits for its copy (on two GPUs about 2.7 ms
    of a 45 ms ResNet-50 step, docs/BENCHMARKS.md). The arrays come already split as fit would split
    them, so fit passes them through.
    """
    import collections

    import jax

    layouts = {}  # by shape: every batch has the same ones

    def place(t):
        if t.shape not in layouts:
            layouts[t.shape] = distribution.get_data_layout(t.shape).backend_layout
        return jax.make_array_from_process_local_data(layouts[t.shape], t)

    pending = collections.deque()
    for batch in batches:
        pending.append(jax.tree_util.tree_map(place, batch))
        if len(pending) > depth:
            yield pending.popleft()
    yield from pending


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
