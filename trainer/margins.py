"""The metric_learning task's training side: the cosine head, the margin losses, and the class-sharded head.

The neck gives an L2-normalised embedding x; MarginHead holds one centre W_j
per class and outputs cos(theta_j) = x.W_j / (|x| |W_j|) for every class j.
The losses are softmax cross-entropies on s * cos(theta_j) for j != y and
s * f(theta_y) at the label y, where the margin makes f(theta) < cos(theta):

  amsoftmax, cosface  f = cos(theta) - m      m: an additive cosine margin
  arcface             f = cos(theta + m)      m: an additive angular margin, in DEGREES
                                              (28.6 deg = 0.4992 rad, PAI's "0.5 rad")
                      and cos(theta) - m sin(m) once theta + m > pi (InsightFace), so
                      that f keeps falling as theta grows
  large_margin,       f = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi)
  sphereface          m: a multiplicative angular margin, a whole number
  softmax             f = cos(theta)          no margin: a normalised softmax (NormFace)

cos(m theta) is the Chebyshev polynomial T_m(cos theta) and k counts the
angles j pi / m (j = 1 .. m-1) that theta passes, so L-Softmax and SphereFace
take no arccos and have a gradient everywhere; ArcFace's sin(theta) is
sqrt(1 - cos^2) with 1 - cos^2 kept >= 1e-7, the least a float32 cosine below 1
gives, so its gradient is finite at cos = +-1 too.

The scale s stands for the feature norm: L-Softmax's logit is
|W| |x| psi(theta) and SphereFace's |x| psi(theta), but here both the features
and the centres are unit vectors, so the two are the same loss and s is the
norm they train with. They train here without the lambda annealing of the
papers (f = (lambda cos + psi) / (1 + lambda)): that was needed for features
whose norm grows freely; with unit features and a fixed scale the tiny
training in tests/test_margins.py converges without it.

"softmax" uses scale 64, CosFace's and ArcFace's, so it is their margin-free
baseline: switching to it changes the margin alone.

With loss_weight w < 1 the head also holds a plain dense classifier on the same
embedding and the loss per image is w * margin loss + (1 - w) * its softmax
cross-entropy (PAI's balance of the metric loss against a classification loss).

Model parallel (JAX only): model_parallel() splits each head kernel by class
over the devices (their columns), so the class count can grow with the devices.
"""

import math

import keras
from keras import ops

from trainer.cli import UserError
from trainer.schema import METRIC_LOSSES

# PAI's recommended (scale, margin) per loss and the margin's unit: {name: (scale, margin, unit)}. The table
# lives in the flag table, which --help reads without importing Keras.
DEFAULTS = METRIC_LOSSES
_MIN_SINE_SQUARED = 1e-7  # 1 - cos^2 for the float32 cosine next below 1 is 1.19e-7


def _cosine_margin(cosine, margin):
    return cosine - margin


def _angular_margin(cosine, degrees):
    m = math.radians(degrees)
    sine = ops.sqrt(ops.clip(1.0 - ops.square(cosine), _MIN_SINE_SQUARED, 1.0))
    shifted = cosine * math.cos(m) - sine * math.sin(m)
    return ops.where(cosine > math.cos(math.pi - m), shifted, cosine - m * math.sin(m))


def _multiplicative_margin(cosine, margin):
    """psi(theta) = (-1)^k cos(m theta) - 2k, with cos(m theta) = T_m(cos theta)."""
    previous, chebyshev = ops.ones_like(cosine), cosine
    for _ in range(margin - 1):
        previous, chebyshev = chebyshev, 2.0 * cosine * chebyshev - previous
    k = ops.zeros_like(cosine)
    for j in range(1, margin):
        k = k + ops.cast(cosine <= math.cos(j * math.pi / margin), cosine.dtype)
    sign = 1.0 - 2.0 * ops.mod(k, 2.0)
    return sign * chebyshev - 2.0 * k


_TARGET_LOGIT = {
    "amsoftmax": _cosine_margin, "cosface": _cosine_margin, "softmax": _cosine_margin,
    "arcface": _angular_margin, "large_margin": _multiplicative_margin, "sphereface": _multiplicative_margin,
}


def _l2_normalize(x, axis):
    # rsqrt of a floored square norm: no infinite gradient at a zero vector, unlike x / |x|.
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=True), 1e-12))


class MarginHead(keras.layers.Layer):
    """Cosines between the L2-normalised input and each class centre, float32 [B, C].

    Its weights: kernel [D, C], one centre per column. plain_classifier=True adds
    an ordinary dense classifier, plain_kernel [D, C] and plain_bias [C], on the
    same input, and the output is [B, 2C]: [cosines | plain logits].
    """

    def __init__(self, num_classes, plain_classifier=False, name="logits", **kwargs):
        kwargs.setdefault("dtype", "float32")  # cosines and logits stay float32 under mixed precision
        super().__init__(name=name, **kwargs)
        self.num_classes, self.plain_classifier = num_classes, plain_classifier

    def build(self, input_shape):
        _check_class_split(self.num_classes, f"{self.path}/kernel")
        shape = (input_shape[-1], self.num_classes)
        self.kernel = self.add_weight(name="kernel", shape=shape, initializer="glorot_uniform")
        if self.plain_classifier:
            self.plain_kernel = self.add_weight(name="plain_kernel", shape=shape, initializer="glorot_uniform")
            self.plain_bias = self.add_weight(name="plain_bias", shape=(self.num_classes,), initializer="zeros")

    def call(self, inputs):
        cosines = ops.matmul(_l2_normalize(inputs, -1), _l2_normalize(self.kernel, 0))
        if not self.plain_classifier:
            return cosines
        return ops.concatenate([cosines, ops.matmul(inputs, self.plain_kernel) + self.plain_bias], axis=-1)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "plain_classifier": self.plain_classifier}


def _check_class_split(num_classes, kernel_path):
    """Under a distribution that splits the kernel by class over n devices, C must be a multiple of n
    (JAX splits arrays evenly)."""
    distribution = keras.distribution.distribution()
    layout = distribution.get_tensor_layout(kernel_path) if distribution else None
    if layout is None or layout.axes[-1] is None:
        return
    devices = layout.device_mesh.shape[layout.device_mesh.axis_names.index(layout.axes[-1])]
    if num_classes % devices:
        raise UserError(f"{num_classes} classes do not split evenly over {devices} devices; the class-sharded "
                        f"head needs a multiple of {devices}")


class MarginLoss(keras.losses.Loss):
    """Per-image margin loss on MarginHead's output; y_true: the label id, [B, 1] or [B]."""

    def __init__(self, metric_loss, num_classes, scale, margin, loss_weight):
        super().__init__(name=metric_loss)
        self.metric_loss, self.num_classes = metric_loss, num_classes
        self.scale, self.margin, self.loss_weight = scale, margin, loss_weight

    def call(self, y_true, y_pred):
        width = y_pred.shape[-1]
        if self.loss_weight < 1 and width is not None and width != 2 * self.num_classes:
            raise ValueError(f"loss_weight {self.loss_weight:g} < 1 needs the plain classifier's logits: "
                             f"MarginHead({self.num_classes}, plain_classifier=True) (the head gives {width} columns)")
        labels = ops.one_hot(ops.cast(ops.reshape(y_true, [-1]), "int32"), self.num_classes, dtype=y_pred.dtype)
        cosines = y_pred[:, :self.num_classes]
        # Only the target's cosine changes: f is computed on B values, not B x C.
        target = ops.sum(cosines * labels, axis=-1, keepdims=True)
        logits = self.scale * (cosines + labels * (_TARGET_LOGIT[self.metric_loss](target, self.margin) - target))
        loss = keras.losses.categorical_crossentropy(labels, logits, from_logits=True)
        if self.loss_weight == 1:
            return loss
        plain = keras.losses.categorical_crossentropy(labels, y_pred[:, self.num_classes:], from_logits=True)
        return self.loss_weight * loss + (1.0 - self.loss_weight) * plain


def margin_loss(metric_loss, num_classes, scale=None, margin=None, loss_weight=1.0):
    """The Keras loss for metric_loss (a DEFAULTS name); scale and margin default to PAI's (DEFAULTS).

    loss_weight in [0, 1]: the margin loss's share; below 1 the head needs plain_classifier=True.
    """
    if metric_loss not in DEFAULTS:
        raise UserError(f"metric loss {metric_loss!r}: choose one of {', '.join(DEFAULTS)}")
    default_scale, default_margin, _ = DEFAULTS[metric_loss]
    scale = default_scale if scale is None else scale
    margin = default_margin if margin is None else margin
    if scale <= 0:
        raise UserError(f"{metric_loss}'s scale must be positive; got {scale:g}")
    if not 0 <= loss_weight <= 1:
        raise UserError(f"loss_weight is the margin loss's share of the loss, in [0, 1]; got {loss_weight:g}")
    _check_margin(metric_loss, margin)
    if _TARGET_LOGIT[metric_loss] is _multiplicative_margin:
        margin = int(margin)
    return MarginLoss(metric_loss, num_classes, float(scale), margin, float(loss_weight))


def _check_margin(metric_loss, margin):
    if metric_loss == "softmax" and margin != 0:
        raise UserError(f"softmax has no margin (got {margin:g}); cosface adds a cosine margin, arcface an angular one")
    if metric_loss == "arcface" and not 0 <= margin < 180:
        raise UserError(f"arcface's margin is an angle in degrees, in [0, 180); got {margin:g}")
    if _TARGET_LOGIT[metric_loss] is _multiplicative_margin and (margin < 1 or margin != int(margin)):
        raise UserError(f"{metric_loss}'s margin multiplies the angle: a whole number >= 1; got {margin:g}")
    if margin < 0:
        raise UserError(f"{metric_loss}'s margin must be >= 0; got {margin:g}")


def class_sharded_layout_map(device_mesh, head="logits", embedding="embedding"):
    """A LayoutMap that splits the head's kernels [D, C] and bias [C] by class over the mesh's last axis.

    It also gives the embedding layer's output [B, D] to every device whole:
    without that, XLA gathers the head's whole kernel [D, C] onto every device
    instead of the (far smaller) embeddings of the batch. Every other variable
    matches no key, so ModelParallel replicates it.
    """
    axis = device_mesh.axis_names[-1]
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[f"{head}/(plain_)?kernel"] = (None, axis)
    layout_map[f"{head}/plain_bias"] = (axis,)
    layout_map[f"{embedding}/output"] = (None, None)
    return layout_map


def model_parallel(devices):
    """keras.distribution.ModelParallel over one mesh axis, "model", of all the devices (JAX only).

    The batch is split over that axis as DataParallel splits it, so the
    backbone stays data parallel and sees each image once; the head's classes
    are split over the same axis, C / n centres per device. Per step, XLA gathers
    the embeddings (B x D), sums the softmax over the shards (a few numbers per
    image) and sums the embeddings' gradient; the kernels never leave their devices.
    With plain_classifier, [cosines | plain logits] is split evenly over the
    devices, so parts of it (B x C / n per device) move between them too.
    Set it before the model is built: variables take their layout when created.
    MarginHead refuses a class count that the devices do not divide.
    """
    mesh = keras.distribution.DeviceMesh(shape=(len(devices),), axis_names=("model",), devices=devices)
    return keras.distribution.ModelParallel(layout_map=class_sharded_layout_map(mesh), batch_dim_name="model")
