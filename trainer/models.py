"""The network: a backbone from the table (backbones.py) with a dense head, and its optimizer.

One builder per backbone family turns a table entry into a function
(input_shape) -> keras.Model of pooled features. Every builder works
offline: ResNets, ViTs and Swins are KerasHub backbones built from config,
EfficientNets keras.applications with weights=None. The model takes uint8
RGB images and does its own normalisation, so callers never preprocess.
"""

import contextlib
import functools
import math
import os
import tempfile

import keras
import numpy as np

from trainer.backbones import BACKBONES
from trainer.cli import UserError
from trainer.tasks import dense_head

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_VARIANCE = ((0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2)


def _resnet(block_type, blocks, input_shape):
    import keras_hub  # imported here: it is slow to import and EfficientNets do not need it

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=list(blocks),
        stackwise_num_strides=[1, 2, 2, 2],
        block_type=block_type,
        use_pre_activation=False,
        image_shape=input_shape,
    )
    inputs = keras.Input(input_shape, name="pixels")
    x = keras.layers.Normalization(mean=IMAGENET_MEAN, variance=IMAGENET_VARIANCE, name="normalize")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone(x))
    return keras.Model(inputs, x, name="backbone")


def _vit(patch_size, num_layers, num_heads, hidden_dim, mlp_dim, input_shape):
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(image_shape=input_shape, patch_size=patch_size, num_layers=num_layers,
                                            num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim)
    inputs = keras.Input(input_shape, name="pixels")
    x = keras.layers.Normalization(mean=IMAGENET_MEAN, variance=IMAGENET_VARIANCE, name="normalize")(inputs)
    tokens = backbone(x)  # [B, 1 + patches, hidden_dim], after the encoder's final layer norm
    return keras.Model(inputs, tokens[:, 0], name="backbone")  # the class token, as the reference ViT classifies


def _swin(patch_size, window_size, embed_dim, depths, num_heads, input_shape):
    import keras_hub

    backbone = keras_hub.models.SwinTransformerBackbone(image_shape=input_shape, patch_size=patch_size,
                                                        window_size=window_size, embed_dim=embed_dim,
                                                        depths=list(depths), num_heads=list(num_heads))
    inputs = keras.Input(input_shape, name="pixels")
    x = keras.layers.Normalization(mean=IMAGENET_MEAN, variance=IMAGENET_VARIANCE, name="normalize")(inputs)
    # The last stage's tokens [B, (side / 32)**2, 8 * embed_dim], averaged as the reference Swin classifies.
    x = keras.layers.GlobalAveragePooling1D(name="avg_pool")(backbone(x))
    return keras.Model(inputs, x, name="backbone")


def _efficientnet(application_name, input_shape, weights=None):
    # keras.applications' EfficientNets rescale and normalise 0-255 input themselves.
    application = getattr(keras.applications, application_name)
    net = application(include_top=False, weights=weights, input_shape=input_shape, pooling="avg")
    return keras.Model(net.input, net.output, name="backbone")


_FAMILIES = {"resnet": _resnet, "efficientnet": _efficientnet, "vit": _vit, "swin": _swin}


def backbone_builder(model_type):
    """(input_shape, **kwargs) -> keras.Model of pooled features, for a --model_type of the table."""
    entry = BACKBONES[model_type]
    return functools.partial(_FAMILIES[entry.family], *entry.args)


def build_model(model_type, num_classes, image_size, weight_decay=0.0, seed=None, one_pass_moments=None,
                imagenet=False, head=None, indexed_max_pool=None, space_to_depth_stem=None):
    """uint8 [B, S, S, 3] -> float32 logits [B, num_classes].

    head: the task's (tasks.py), (features, num_classes) -> logits; the classifier's dense layer when None.
    imagenet: start the backbone from Keras' ImageNet weights (efficientnet-*
    only; keras.applications downloads them once into ~/.keras).
    one_pass_moments: batch-norm statistics as E[x^2] - E[x]^2 (see
    _one_pass_moments); None means on with the JAX backend only. Built under a
    keras.distribution that splits the batch over several devices, batch norm
    also takes each device's statistics (_per_device_batch_norm), each device
    keeps its own moving averages (_keep_moving_stats_per_device), and on JAX each
    convolution keeps its kernel's cast for the backward pass (_kernel_cast_once).
    indexed_max_pool: max pooling differentiated through the index of each
    window's maximum (_indexed_max_pool); None means on with the JAX backend only.
    space_to_depth_stem: stride-2 convolutions over at most four channels (the
    stem) run as stride-1 convolutions over blocks of pixels
    (_space_to_depth_conv); None means on with the JAX backend only.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1.0, name="to_float")(inputs)  # uint8 -> compute dtype
    backbone = backbone_builder(model_type)
    x = (backbone((image_size, image_size, 3), weights="imagenet") if imagenet else backbone((image_size, image_size, 3)))(x)
    logits = (head or dense_head)(x, num_classes)
    model = keras.Model(inputs, logits, name=model_type.replace("-", "_"))
    if weight_decay:
        add_weight_decay(model, weight_decay)
    if one_pass_moments is None:
        one_pass_moments = keras.backend.backend() == "jax"
    shards = batch_shards()
    if one_pass_moments:
        for layer in _all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized:
                layer._moments = functools.partial(_one_pass_moments, layer)
                if shards > 1:
                    layer.call = functools.partial(_per_device_batch_norm, layer, shards)
                    if not layer.renorm and _single_process():
                        _keep_moving_stats_per_device(layer, shards)
    if keras.backend.backend() == "jax" and shards > 1:
        for layer in _all_layers(model):
            if hasattr(layer, "convolution_op"):  # Keras' convolutions: Conv1D, Conv2D, Conv3D
                layer.convolution_op = functools.partial(_kernel_cast_once, layer.convolution_op)
    jax_default = keras.backend.backend() == "jax"
    indexed_max_pool = jax_default if indexed_max_pool is None else indexed_max_pool
    space_to_depth_stem = jax_default if space_to_depth_stem is None else space_to_depth_stem
    for layer in _all_layers(model):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            continue
        if indexed_max_pool and isinstance(layer, keras.layers.MaxPooling2D):
            layer.call = functools.partial(_indexed_max_pool, layer)
        elif (space_to_depth_stem and type(layer) is keras.layers.Conv2D and layer.padding == "valid"
              and layer.strides == (2, 2) and layer.dilation_rate == (1, 1) and layer.groups == 1
              and layer.kernel.shape[2] <= 4):
            layer.call = functools.partial(_space_to_depth_conv, layer)
    return model


def batch_shards():
    """How many devices the current keras.distribution splits a batch over (1 without one)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


def _per_device_batch_norm(layer, shards, inputs, training=None, mask=None):
    """A training step's batch norm over each device's share of the batch, as PyTorch DDP and TensorFlow's
    MirroredStrategy normalise; the moving averages take the mean of the devices' statistics.

    Under keras.distribution one jitted step sees the global batch, so Keras' batch norm averages over
    every device: the statistics of each layer, and their gradient, cross devices one small all-reduce at a
    time, each waited for before the next layer can start. The batch is split into its devices' shares
    (the rows each device holds) and each share normalised by its own statistics, which need no other
    device. The moving averages are the mean over devices of what each device moves towards its own
    statistics (_keep_moving_stats_per_device): within one process the step has no cross-device traffic
    but the gradients'.
    """
    batch = inputs.shape[0]
    if not (training and layer.trainable) and hasattr(layer, "device_moving_mean"):
        return _normalised_by_moving_stats(layer, inputs, keras.ops.mean(layer.device_moving_mean, axis=0),
                                           keras.ops.mean(layer.device_moving_variance, axis=0))
    if (not (training and layer.trainable) or mask is not None or layer.renorm or batch is None or batch % shards
            or layer.axis % len(inputs.shape) != len(inputs.shape) - 1):
        return type(layer).call(layer, inputs, training=training, mask=mask)
    ops = keras.ops
    x = ops.reshape(ops.cast(inputs, "float32"), (shards, batch // shards, *inputs.shape[1:]))
    # a device's images and positions: not the device, not the channel
    mean, variance = _mean_and_variance(x, tuple(range(1, len(x.shape) - 1)), keepdims=True)
    momentum = layer.momentum
    if hasattr(layer, "device_moving_mean"):  # each device moves its own averages: no cross-device traffic
        for averages, value in ((layer.device_moving_mean, mean), (layer.device_moving_variance, variance)):
            averages.assign(averages * momentum + ops.reshape(value, (shards, -1)) * (1 - momentum))
    else:
        layer.moving_mean.assign(
            layer.moving_mean * momentum + ops.reshape(ops.mean(mean, axis=0), [-1]) * (1 - momentum))
        layer.moving_variance.assign(
            layer.moving_variance * momentum + ops.reshape(ops.mean(variance, axis=0), [-1]) * (1 - momentum))
    scale = ops.rsqrt(variance + layer.epsilon)
    if layer.scale:
        scale = scale * ops.cast(layer.gamma, "float32")
    shift = -mean * scale + (ops.cast(layer.beta, "float32") if layer.center else 0.0)
    return ops.cast(ops.reshape(x * scale + shift, inputs.shape), layer.compute_dtype)


def _kernel_cast_once(convolution_op, inputs, kernel):
    """A convolution whose kernel, cast to the compute dtype, is what the backward pass's data gradient reads
    too (a kept value, not recomputed there from the float32 variable).

    Recomputed, the cast shares its input with the optimizer's update of the same kernel, and XLA fuses the
    two into one kernel: the backward pass then waits at every such layer for the update, which waits for
    the gradient's all-reduce across devices. On one device that costs nothing; over two GPUs it put 30
    all-reduces of ResNet-50's step on its critical path, 29 of them waited for as soon as they started.
    Kept, the cast is read by the backward pass and the all-reduces can run beside it.
    """
    import jax

    return convolution_op(inputs, jax.lax.optimization_barrier(keras.ops.convert_to_tensor(kernel)))


def _single_process():
    import jax

    return jax.process_count() == 1


def _keep_moving_stats_per_device(layer, shards):
    """Gives a batch norm layer moving averages per device, [shards, channels], each row on its device.

    _per_device_batch_norm's moving averages move towards the mean over devices of the devices'
    statistics. That mean is linear, so it can be taken when the averages are read rather than in every
    step: each device moves its own row towards its own statistics, and the model's moving mean and
    variance are the mean of the rows. The step then has no cross-device traffic for them (over two
    GPUs, 106 of ResNet-50's 213 small tensors fewer in its last all-reduce, each of which costs a slice
    and an update kernel after it). Inference takes the rows' mean; checkpoints keep Keras' own layout
    (_save_moving_stats_mean). Within one process only: the rows' mean is read on the host.
    """
    distribution = keras.distribution.distribution()
    layout = keras.distribution.TensorLayout((distribution.batch_dim_name, None), distribution.device_mesh)
    layer._tracker.unlock()
    try:
        for name in ("moving_mean", "moving_variance"):
            keras_average = getattr(layer, name)
            rows = np.broadcast_to(keras.ops.convert_to_numpy(keras_average), (shards, keras_average.shape[0]))
            setattr(layer, f"device_{name}", keras.Variable(rows, trainable=False, name=f"device_{name}", layout=layout))
    finally:
        layer._tracker.lock()
    layer.save_own_variables = functools.partial(_save_moving_stats_mean, layer)
    layer.load_own_variables = functools.partial(_load_moving_stats_mean, layer)


def moving_stats_on_the_layer(layer):
    """Undoes _keep_moving_stats_per_device: the layer's own moving averages (their rows' mean) again,
    moved in the step as before (--sync_batch_norm; bench/gpu_throughput.py --moving_stats global)."""
    if not hasattr(layer, "device_moving_mean"):
        return
    for name in ("moving_mean", "moving_variance"):
        getattr(layer, name).assign(np.mean(keras.ops.convert_to_numpy(getattr(layer, f"device_{name}")), axis=0))
    for method in ("save_own_variables", "load_own_variables"):
        vars(layer).pop(method)
    del layer.device_moving_mean, layer.device_moving_variance


def _keras_variables(layer):
    """A batch norm layer's own variables, in Keras' order, without the per-device moving averages."""
    device = (getattr(layer, "device_moving_mean", None), getattr(layer, "device_moving_variance", None))
    return [v for v in layer._trainable_variables + layer._non_trainable_variables if not any(v is d for d in device)]


def _save_moving_stats_mean(layer, store):
    """Layer.save_own_variables in Keras' layout: the moving averages are the mean of the devices' rows.

    The rows are set to that mean as well, which is where loading the checkpoint puts them: a run resumed
    from it and the run that went on from it hold the same values.
    """
    for name in ("moving_mean", "moving_variance"):
        rows = getattr(layer, f"device_{name}")
        mean = np.mean(keras.ops.convert_to_numpy(rows), axis=0)
        getattr(layer, name).assign(mean)
        rows.assign(np.broadcast_to(mean, rows.shape))
    for i, variable in enumerate(_keras_variables(layer)):
        store[f"{i}"] = variable


def _load_moving_stats_mean(layer, store):
    """Layer.load_own_variables from Keras' layout; every device's row starts at the loaded moving averages."""
    variables = _keras_variables(layer)
    if len(store.keys()) != len(variables):
        raise ValueError(f"Layer '{layer.name}' expected {len(variables)} variables, but received "
                         f"{len(store.keys())} variables during loading. Expected: {[v.name for v in variables]}")
    for i, variable in enumerate(variables):
        variable.assign(store[f"{i}"])
    for name in ("moving_mean", "moving_variance"):
        rows = getattr(layer, f"device_{name}")
        rows.assign(np.broadcast_to(keras.ops.convert_to_numpy(getattr(layer, name)), rows.shape))


def _normalised_by_moving_stats(layer, inputs, moving_mean, moving_variance):
    """Keras' batch norm at inference (its call with training=False) with the moving averages given."""
    ops = keras.ops
    dtype = keras.backend.result_type(inputs.dtype, "float32")
    outputs = ops.batch_normalization(
        ops.cast(inputs, dtype), ops.cast(moving_mean, dtype), ops.cast(moving_variance, dtype), axis=layer.axis,
        offset=ops.cast(layer.beta, dtype) if layer.center else None,
        scale=ops.cast(layer.gamma, dtype) if layer.scale else None, epsilon=layer.epsilon)
    return ops.cast(outputs, layer.compute_dtype)


def _indexed_max_pool(layer, inputs):
    """A MaxPooling2D layer's output, with a gradient that goes through the index of each window's maximum
    (JAX; channels_last).

    XLA differentiates Keras' max pool with a select-and-scatter: on a GPU that one kernel took 1.3 ms of a
    36 ms ResNet-50 step, for the stem's one pool over [256, 113, 113, 64]. Here the forward pass also keeps,
    for every output, which of the window's positions held the maximum (the first one in row-major order on
    ties, the one the select-and-scatter picks), and the gradient puts each output's gradient back at that
    position: two elementwise passes XLA fuses, as PyTorch's pool keeps its indices (ResNet-50 on an H200:
    2.2% more images/s, docs/BENCHMARKS.md). The gradient is assembled per stride residue at the outputs'
    resolution, so that each input position adds only the few offsets that can reach it (0.9% more again).
    Values and gradients are Keras' own.
    """
    import jax
    import jax.numpy as jnp

    (kh, kw), (sh, sw) = layer.pool_size, layer.strides
    x = inputs
    if layer.padding == "same":  # -inf around the edges, as XLA's windowed max pads
        x = jnp.pad(x, [(0, 0), *(_same_padding(n, k, s) for n, k, s in zip(x.shape[1:3], (kh, kw), (sh, sw))),
                        (0, 0)], constant_values=-jnp.inf)
    _, height, width, _ = x.shape
    rows, cols = (height - kh) // sh + 1, (width - kw) // sw + 1
    offsets = [(i, j) for i in range(kh) for j in range(kw)]
    index_dtype = jnp.int8 if len(offsets) < 128 else jnp.int32

    def window(t, i, j):  # the window position (i, j) of every output: [B, rows, cols, C]
        return t[:, i:i + sh * (rows - 1) + 1:sh, j:j + sw * (cols - 1) + 1:sw, :]

    def maximum_and_index(t):
        best = window(t, 0, 0)
        index = jnp.zeros(best.shape, index_dtype)
        for k, (i, j) in enumerate(offsets[1:], start=1):
            candidate = window(t, i, j)
            # strictly greater: of equal maxima the first keeps the index
            index = jnp.where(candidate > best, jnp.asarray(k, index_dtype), index)
            best = jnp.maximum(best, candidate)  # NaN-propagating, as the windowed max
        return best, index

    @jax.custom_vjp
    def pool(t):
        return maximum_and_index(t)[0]

    def backward(index, gradient):
        # Each input position p = s*q + r (0 <= r < s) takes gradient from the window offsets i with
        # i = r (mod s), from output q - (i - r) // s. So the gradient is built per residue (r, c) at
        # the outputs' resolution, each a sum of shifted, masked output gradients, and the residues are
        # then interleaved into pixels: every input position reads only its own residue's few terms.
        zero = jnp.zeros((), gradient.dtype)
        n, channels = gradient.shape[0], gradient.shape[3]
        blocks_high, blocks_wide = -(-height // sh), -(-width // sw)
        residues = []
        for r in range(sh):
            for c in range(sw):
                total = None
                # Reverse row-major offsets: the windows that share a position add up in the order the
                # select-and-scatter visits them (row-major over the outputs).
                for k in reversed(range(len(offsets))):
                    i, j = offsets[k]
                    if i % sh != r or j % sw != c:
                        continue
                    di, dj = i // sh, j // sw
                    placed = jnp.pad(jnp.where(index == k, gradient, zero),
                                     [(0, 0), (di, blocks_high - rows - di), (dj, blocks_wide - cols - dj), (0, 0)])
                    total = placed if total is None else total + placed
                # (a stride wider than the window leaves positions no window reaches: zero gradient)
                residues.append(jnp.zeros((n, blocks_high, blocks_wide, channels), gradient.dtype)
                                if total is None else total)
        pixels = jnp.stack(residues, axis=3).reshape(n, blocks_high, blocks_wide, sh, sw, channels)
        pixels = pixels.transpose(0, 1, 3, 2, 4, 5).reshape(n, blocks_high * sh, blocks_wide * sw, channels)
        return (pixels[:, :height, :width, :],)

    pool.defvjp(maximum_and_index, backward)  # the forward pass keeps the index for the backward
    return pool(x)


def _space_to_depth_conv(layer, inputs):
    """A Conv2D layer with stride s > 1 over few channels (a ResNet's stem: 7x7, stride 2, 3 channels), as a
    stride-1 convolution over s x s blocks of pixels folded into channels, with the kernel rearranged to
    match: the same sums, over s^2 times the channels, which the GPU's convolution kernels run far faster
    (one H200, docs/BENCHMARKS.md: ResNet-50's step +4.4%, EfficientNet-B0's +12%). The folded channels are
    zero-padded to a multiple of 16 (RGB at s = 2: 12 -> 16), where cuDNN's kernels run faster again
    (ResNet-50 +0.6%, EfficientNet-B0 +1.0%).
    """
    import jax.numpy as jnp

    s = layer.strides[0]
    kh, kw, channels, filters = layer.kernel.shape
    _, height, width, _ = inputs.shape
    rows, cols = (height - kh) // s + 1, (width - kw) // s + 1
    x = jnp.pad(inputs, [(0, 0), (0, -height % s), (0, -width % s), (0, 0)])
    n, h, w, c = x.shape
    x = x.reshape(n, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // s, w // s, s * s * c)
    kernel = jnp.pad(layer.kernel.value, [(0, -kh % s), (0, -kw % s), (0, 0), (0, 0)])
    bh, bw = kernel.shape[0] // s, kernel.shape[1] // s
    kernel = kernel.reshape(bh, s, bw, s, channels, filters).transpose(0, 2, 1, 3, 4, 5).reshape(
        bh, bw, s * s * channels, filters)
    x = jnp.pad(x, [(0, 0), (0, 0), (0, 0), (0, -x.shape[3] % 16)])
    kernel = jnp.pad(kernel, [(0, 0), (0, 0), (0, -kernel.shape[2] % 16), (0, 0)])
    outputs = keras.ops.conv(x, keras.ops.cast(kernel, layer.compute_dtype), strides=1, padding="valid")
    outputs = outputs[:, :rows, :cols, :]
    if layer.use_bias:
        outputs = outputs + keras.ops.cast(layer.bias, layer.compute_dtype)
    return layer.activation(outputs) if layer.activation is not None else outputs


def _same_padding(size, window, stride):
    """(before, after) padding of a 'same' window along one axis, as XLA and Keras place it."""
    total = max((-(-size // stride) - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def _one_pass_moments(layer, inputs, mask):
    """Batch mean and variance from one read of the activations (inputs are float32 here).

    Keras computes the variance as mean((x - mean)^2): a second full pass over
    every batch-norm input, forward and again in the gradient. On a GPU these
    passes, not the convolutions, bound ResNet training (bs 256: ~5 GB per pass
    over all ResNet-50 batch-norm inputs). Same formula as Flax's default
    (use_fast_variance); the clamp keeps rounding from making it negative.
    """
    if mask is not None:
        return type(layer)._moments(layer, inputs, mask)
    return _mean_and_variance(inputs, layer._reduction_axes)


def _mean_and_variance(x, axes, keepdims=False):
    """Mean and variance of x over axes as E[x] and E[x^2] - E[x]^2, clamped at 0 against rounding."""
    mean = keras.ops.mean(x, axis=axes, keepdims=keepdims)
    mean_of_squares = keras.ops.mean(keras.ops.square(x), axis=axes, keepdims=keepdims)
    return mean, keras.ops.maximum(mean_of_squares - keras.ops.square(mean), 0.0)


def make_optimizer(optimizer_type, learning_rate, optimizer_arguments=(), ema_decay=0.0, frozen=(), frozen_steps=0,
                   weight_decay=0.0, not_decayed=()):
    """momentum (SGD, momentum 0.9 unless given) | adam | rmsprop | adamw, with extra constructor arguments.

    weight_decay, not_decayed: adamw's decoupled weight decay. Every step each
    trainable weight w but those of not_decayed (see `not_decayed`) becomes
    w * (1 - learning_rate * weight_decay) before the Adam update, as in Keras's
    and PyTorch's AdamW. It replaces the L2 loss term build_model adds for the
    other optimizers, so for them weight_decay must be 0 here.
    ema_decay > 0: the optimizer also keeps an exponential moving average of the
    weights (Keras's use_ema; `averaged_weights` swaps it in), its decay warmed up
    as min(ema_decay, step / (10 + step)) so that the random initial weights do
    not linger in the average of a short run (0.999 ** 1000 = 0.37).
    frozen, frozen_steps: these variables get no update for the first frozen_steps
    steps (their gradients are zeroed, and adamw does not decay them), so the
    optimizer's variables, and a checkpoint's, are the same whether or not a run starts frozen.
    """
    if weight_decay and optimizer_type != "adamw":
        raise ValueError(f"{optimizer_type}: weight decay is build_model's loss term; only adamw decays the weights itself")
    kwargs = dict(optimizer_arguments)
    if ema_decay:
        kwargs.update(use_ema=True, ema_momentum=ema_decay)
    if optimizer_type == "momentum":
        kwargs.setdefault("momentum", 0.9)
    if optimizer_type == "adamw":
        kwargs["weight_decay"] = weight_decay
    cls = {"momentum": keras.optimizers.SGD, "adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop,
           "adamw": keras.optimizers.AdamW}[optimizer_type]
    if frozen_steps:
        cls = _frozen_at_first(cls, {id(v) for v in frozen}, frozen_steps)
    if ema_decay:
        cls = _warmed_up_average(cls)
    optimizer = cls(learning_rate=learning_rate, **kwargs)
    if optimizer_type == "adamw":
        optimizer.exclude_from_weight_decay(var_list=list(not_decayed))
    return optimizer


def ema_decay_at(step, ema_decay):
    """The moving average's decay at a step (0-based; 0 at step 0: the average starts as the weights)."""
    return keras.ops.minimum(ema_decay, step / (10.0 + step))


def _warmed_up_average(cls):
    """A subclass of optimizer class cls whose weights' average uses ema_decay_at()."""

    def _update_model_variables_moving_average(self, trainable_variables):
        step = keras.ops.cast(self.iterations, "float32")
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is None:
                continue
            decay = keras.ops.cast(ema_decay_at(step, self.ema_momentum), var.dtype)
            average.assign(decay * average + (1 - decay) * var)

    return type(f"Averaged{cls.__name__}", (cls,), {"_update_model_variables_moving_average":
                                                     _update_model_variables_moving_average})


def _frozen_at_first(cls, frozen_ids, frozen_steps):
    """A subclass of optimizer class cls that leaves the variables of frozen_ids alone before step frozen_steps:
    their gradients are zeroed and, with a decoupled weight decay (adamw), they are not decayed."""

    def thawed(self):
        return keras.ops.greater_equal(self.iterations, frozen_steps)

    def apply(self, grads, trainable_variables=None):
        variables = self._trainable_variables if trainable_variables is None else list(trainable_variables)
        grads = [g if g is None or id(v) not in frozen_ids else g * keras.ops.cast(thawed(self), g.dtype)
                 for g, v in zip(grads, variables)]
        return cls.apply(self, grads, trainable_variables)

    def _apply_weight_decay(self, variables):
        # Decoupled decay does not go through the gradients, so the frozen variables are decayed apart, at the
        # rate times 0 until they thaw. The rate is swapped back at once: each replica's call sets the same value.
        rate = self.weight_decay
        cls._apply_weight_decay(self, [v for v in variables if id(v) not in frozen_ids])
        if not rate:
            return
        self.weight_decay = rate * keras.ops.cast(thawed(self), "float32")
        try:
            cls._apply_weight_decay(self, [v for v in variables if id(v) in frozen_ids])
        finally:
            self.weight_decay = rate

    return type(f"HeadFirst{cls.__name__}", (cls,), {"apply": apply, "_apply_weight_decay": _apply_weight_decay})


def inner_optimizer(optimizer):
    """The optimizer that holds the weights' average (under mixed_float16 a loss-scaling one wraps it)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


@contextlib.contextmanager
def averaged_weights(model):
    """Inside: the model's trainable weights are the optimizer's moving average (when it keeps one)."""
    optimizer = inner_optimizer(model.optimizer)
    if not getattr(optimizer, "use_ema", False) or not optimizer.built:
        yield
        return
    raw = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    optimizer.finalize_variable_values(model.trainable_variables)  # copies the averages in
    try:
        yield
    finally:
        for variable, value in zip(model.trainable_variables, raw):
            variable.assign(value)


class HardestFraction(keras.losses.Loss):
    """Online hard example mining: the mean of the per-image losses of the top_ratio hardest images of a batch.

    The other images' losses are zeroed and the kept ones scaled by B / k, so
    Keras's mean over the batch (after any sample weights) is the mean of the k kept.
    """

    def __init__(self, loss, top_ratio):
        super().__init__(name=f"hardest_{top_ratio:g}_of_{loss.name}")
        self.loss, self.top_ratio = loss, top_ratio

    def call(self, y_true, y_pred):
        per_image = self.loss.call(y_true, y_pred)  # [B]
        batch = per_image.shape[0]
        if batch is None:  # an unknown batch (a trace without shapes): no selection
            return per_image
        k = max(1, math.ceil(self.top_ratio * batch))
        _, hardest = keras.ops.top_k(per_image, k)
        keep = keras.ops.sum(keras.ops.one_hot(hardest, batch, dtype=per_image.dtype), axis=0)
        return per_image * keep * (batch / k)


def set_synchronized_batch_norm(model):
    """Batch-norm statistics over the global batch on several devices (--sync_batch_norm).

    TensorFlow: Keras' synchronized batch norm under the distribution strategy. JAX: Keras' own call again
    in place of _per_device_batch_norm; one jitted step sees the batch as one array over the devices, so
    its statistics are the global batch's.
    """
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            if keras.backend.backend() == "tensorflow":
                layer.synchronized = True
            else:
                vars(layer).pop("call", None)
                moving_stats_on_the_layer(layer)  # Keras' call moves the layer's own averages


def compile_model(model, optimizer, loss, **compile_kwargs):
    """The training step the trainer runs (and bench/ measures): the task's loss, and its mean as a metric.

    fit's "loss" includes the weight-decay term; "data_loss" is the task's loss
    alone over the same steps, so a progress line can show the two apart.
    Evaluation metrics are computed apart, exactly, from predictions
    (tasks.py, metrics.py), so no others are compiled in.
    """
    model.compile(optimizer=optimizer, loss=loss, metrics=[LossMean(loss)], **compile_kwargs)


class LossMean(keras.metrics.Mean):
    """The mean of a loss over the steps since the last reset, weighted as the training loss is."""

    def __init__(self, loss, name="data_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.loss = loss

    def update_state(self, y_true, y_pred, sample_weight=None):
        # Under a TensorFlow strategy a Loss divides its value by the replicas (each replica's share of the
        # sum); Keras's own loss metric multiplies it back, and so does this one.
        from keras.src.losses.loss import unscale_loss_for_distribution

        value = unscale_loss_for_distribution(self.loss(y_true, y_pred, sample_weight=sample_weight))
        return super().update_state(value)


def add_weight_decay(model, weight_decay):
    """loss += weight_decay * sum(w**2) / 2 over the kernels (see `_kernels`).

    That is the definition in Google's built-in algorithm (tf.nn.l2_loss);
    biases and normalisation parameters are left alone.
    """
    regularizer = keras.regularizers.L2(weight_decay / 2)
    for kernel in _kernels(model):
        kernel.regularizer = regularizer


def not_decayed(model):
    """The trainable weights weight decay leaves alone: all but the kernels (biases, norm scales and offsets,
    position embeddings, ViT's class token, Swin's relative position biases), as timm leaves them."""
    kernels = {id(kernel) for kernel in _kernels(model)}
    return [v for v in model.trainable_variables if id(v) not in kernels]


def _kernels(model):
    """The trainable kernels of the convolutions (depthwise too) and of the dense and attention projections."""
    for layer in _all_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None and hasattr(layer, "depthwise_kernel"):
            kernel = layer.depthwise_kernel
        if kernel is not None and kernel.trainable:
            yield kernel


def _all_layers(model):
    """Every layer inside model, however nested: in sub-models and in plain layers (a transformer block's
    attention and MLP). Keras's own walk, the one that collects the layers' losses."""
    return model._flatten_layers(include_self=False)


def load_pretrained(model, path, model_type, image_size):
    """Loads backbone weights from a file of the same model_type; the head too when its shape matches.

    A file that is not a Keras weights file (random bytes, a zip without weights) or holds another model's
    weights is a UserError naming it.
    """
    import zipfile

    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise UserError(f"--pretrained_checkpoint_path: {path} does not exist")
    if not path.endswith((".weights.h5", ".keras")):
        raise UserError(f"--pretrained_checkpoint_path: {path} should be a .weights.h5 or .keras file saved by this trainer")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        tf.io.gfile.copy(path, local)  # h5 needs a local file; this also fetches gs://
        source_classes = _head_size(local, path)
        source = build_model(model_type, source_classes, image_size)
        try:
            source.load_weights(local)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"--pretrained_checkpoint_path: {path} does not hold {model_type} weights ({detail})") from None
    model.get_layer("backbone").set_weights(source.get_layer("backbone").get_weights())
    if source_classes == getattr(model.get_layer("logits"), "units", None):  # a metric-learning head: backbone only
        model.get_layer("logits").set_weights(source.get_layer("logits").get_weights())
    return source_classes


def _head_size(local_path, shown_path):
    """Number of classes of the head stored in a weights file saved by this trainer (shown_path: as the user
    named it, for errors)."""
    import zipfile

    import h5py

    # Weights files name variables by layer class: the classifier's only
    # top-level Dense layer is the head; vars/1 is its bias.
    try:
        if local_path.endswith(".keras"):
            with zipfile.ZipFile(local_path) as archive, archive.open("model.weights.h5") as f, h5py.File(f, "r") as h5:
                return _bias_size(h5)
        with h5py.File(local_path, "r") as h5:
            return _bias_size(h5)
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        kind = "a .keras file (a zip holding model.weights.h5)" if local_path.endswith(".keras") else "an HDF5 weights file"
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--pretrained_checkpoint_path: {shown_path} is not {kind} saved by Keras ({detail})") from None


def _bias_size(h5):
    if "layers/dense/vars/1" not in h5:
        raise UserError("--pretrained_checkpoint_path: no classification head in the weights file (not saved by this trainer?)")
    return h5["layers/dense/vars/1"].shape[0]
