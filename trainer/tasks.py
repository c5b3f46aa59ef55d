"""What a task is: one Task per --task, and the only place that tells them apart.

A Task says how labels are read (one id or several per image), how they
become targets, the head on the backbone's features, the loss, how logits
become probabilities, which layer's output is evaluated and exported (the
logits, or metric learning's embedding), how an evaluation is scored (and what
it keeps for the export, such as thresholds), which metrics it reports for
tuning (the first picks the best evaluation unless --hyperparameter_metric_tag
names another), and what the exported SavedModel returns. Classification,
multi-label and metric learning are three instances of one dataclass; a new task
is a new instance here, and nothing else in the trainer asks which task it runs
(the run report draws each task's own pictures). TensorFlow, Keras and NumPy are
imported inside the functions, so the flag table can list the tasks without them.
"""

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    description: str  # for --help
    metrics: tuple  # evaluation metrics it can tune on, higher is better; the first is the default
    several_labels: bool  # labels are lists of ids (TFRecord VarLen feature, 'path 1,4,7' lines)
    target: Callable  # (label ids tensor, num_classes) -> target vector (float; metric learning: the id, int64)
    head: Callable  # (pooled features, num_classes, **head_options) -> float32 output, a Keras layer named "logits"
    loss: Callable  # (config) -> Keras loss on the head's output
    probabilities: Callable  # evaluated output tensor (float32 or float64) -> what the run report shows
    evaluate: Callable  # (evaluated outputs [N, K] float64 NumPy, targets [N, T], settings) -> {metric: value, ...}
    export_outputs: Callable  # (evaluated output tensor, class names tensor, evaluation) -> {output: tensor}
    # The default smallest area a random training crop keeps: a crop that drops most of the image
    # suits one object per image, but cuts some of a multi-label image's objects out while keeping their labels.
    crop_min_area: float = 0.08
    evaluated_layer: str = "logits"  # the layer whose output evaluation and the export take
    open_set: bool = False  # validation labels may lie outside the training classes [0, num_classes)
    head_options: Callable = lambda c: {}  # (config) -> head keyword arguments (the export keeps them)
    export_metadata: Callable = lambda c: {}  # (config) -> {name: str or int} the export's metadata adds

    def evaluated_model(self, model):
        """The model whose output evaluation scores and the export serves: model itself, or up to a layer."""
        if self.evaluated_layer == "logits":
            return model
        import keras

        return keras.Model(model.input, model.get_layer(self.evaluated_layer).output, name=f"{model.name}_evaluated")

    def metrics_for(self, num_classes):
        """The metrics an evaluation with num_classes classes reports for tuning."""
        return tuple(m for m in self.metrics if m != "top_5_accuracy" or num_classes > 5)


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    threshold: str = "0.5"  # multi-label: a probability, or "auto" (per-class F1-best)
    class_names: tuple = None  # set: report per-class figures too


def dense_head(features, num_classes, **unused):
    """The classifier head: one dense layer to a logit per class (float32 under mixed precision)."""
    import keras

    return keras.layers.Dense(num_classes, dtype="float32", name="logits")(features)


# Classification: one label per image, softmax.

def _one_hot(label, num_classes):
    import tensorflow as tf

    return tf.one_hot(label, num_classes)


def _categorical_loss(c):
    import keras

    return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=c.label_smoothing)


def _softmax(logits):
    import tensorflow as tf

    return tf.nn.softmax(logits, axis=-1)


def _evaluate_classification(logits, targets, settings):
    from trainer import metrics

    return metrics.classification(_softmax(logits).numpy(), targets.argmax(axis=1))


def _classification_outputs(logits, names, evaluation):
    """probabilities [B, C] and the top k = min(5, C) classes, scores and class_names."""
    import tensorflow as tf

    probabilities = _softmax(logits)
    top = tf.math.top_k(probabilities, k=min(5, int(logits.shape[-1])))
    return {
        "probabilities": probabilities,
        "classes": tf.cast(top.indices, tf.int64),
        "scores": top.values,
        "class_names": tf.gather(names, top.indices),
    }


# Multi-label: any number of labels per image, a sigmoid per class.

def _multi_hot(label, num_classes):
    import tensorflow as tf

    return tf.minimum(tf.reduce_sum(tf.one_hot(label, num_classes), axis=0), 1.0)


def _binary_loss(c):
    import keras

    return keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=c.label_smoothing)


def _sigmoid(logits):
    import tensorflow as tf

    return tf.sigmoid(logits)


def _evaluate_multi_label(logits, targets, settings):
    """Metrics at the thresholds, which the result carries (the best evaluation's go into the export)."""
    import numpy as np

    from trainer import metrics

    probabilities = _sigmoid(logits).numpy()
    if settings.threshold == "auto":
        thresholds = metrics.best_f1_thresholds(probabilities, targets)
    else:
        thresholds = np.full(targets.shape[1], float(settings.threshold))
    result = metrics.multi_label(probabilities, targets, thresholds, settings.class_names)
    return {**result, "thresholds": [float(t) for t in thresholds]}


def _multi_label_outputs(logits, names, evaluation):
    """probabilities, predictions (bool per class, the evaluation's thresholds), and the predicted
    classes / scores / class_names [B, C], most probable first, padded with -1 / 0 / ""."""
    import tensorflow as tf

    if "thresholds" not in evaluation:
        raise ValueError("a multi-label export needs the thresholds of the evaluation it exports")
    probabilities = _sigmoid(logits)
    predictions = probabilities >= tf.constant(evaluation["thresholds"], tf.float32)
    order = tf.argsort(probabilities + tf.cast(predictions, tf.float32) * 2.0, axis=-1, direction="DESCENDING")
    chosen = tf.gather(predictions, order, batch_dims=1)
    return {
        "probabilities": probabilities,
        "predictions": predictions,
        "classes": tf.where(chosen, tf.cast(order, tf.int64), tf.constant(-1, tf.int64)),
        "scores": tf.where(chosen, tf.gather(probabilities, order, batch_dims=1), 0.0),
        "class_names": tf.where(chosen, tf.gather(names, order), ""),
    }


# Metric learning: a backbone and a neck trained with a margin loss (margins.py); evaluated and served as
# L2-normalised embeddings, scored by retrieval among the validation images (retrieval.py).

def _label_id(label, num_classes):
    """The label id itself, [1]: the margin loss one-hots it; retrieval compares ids, which may lie outside
    the training classes (open set), so the target keeps them exactly (int64)."""
    import tensorflow as tf

    return tf.reshape(tf.cast(label, tf.int64), [1])


def embedding_head(features, num_classes, embedding_size=1536, plain_classifier=False):
    """The neck (a dense layer to embedding_size, L2-normalised: the layer named "embedding") and the
    margin head on it: float32 cosines to each class centre [B, C] (and plain logits [B, C] after them
    when plain_classifier, for --loss_weight < 1)."""
    import keras

    from trainer import margins

    x = keras.layers.Dense(embedding_size, name="neck")(features)
    embedding = keras.layers.UnitNormalization(dtype="float32", name="embedding")(x)
    return margins.MarginHead(num_classes, plain_classifier=plain_classifier, name="logits")(embedding)


def _margin_loss(c):
    from trainer import margins

    return margins.margin_loss(c.metric_loss, c.num_classes, scale=c.loss_scale, margin=c.loss_margin,
                               loss_weight=c.loss_weight)


def _identity(embeddings):
    import tensorflow as tf

    return tf.convert_to_tensor(embeddings)


def _evaluate_retrieval(embeddings, targets, settings):
    from trainer import retrieval

    return retrieval.retrieval_metrics(embeddings, targets[:, 0].astype("int64"))


def _embedding_outputs(embeddings, names, evaluation):
    return {"embeddings": embeddings}


CLASSIFICATION = Task(
    name="classification", description="one label per image (softmax)",
    metrics=("top_1_accuracy", "top_5_accuracy"), several_labels=False, target=_one_hot, head=dense_head,
    loss=_categorical_loss, probabilities=_softmax, evaluate=_evaluate_classification,
    export_outputs=_classification_outputs,
)
MULTI_LABEL = Task(
    name="multi_label", description="any number of labels per image (a sigmoid per class)",
    metrics=("mAP", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "micro_precision", "micro_recall",
             "exact_match"),
    several_labels=True, target=_multi_hot, head=dense_head, loss=_binary_loss, probabilities=_sigmoid,
    evaluate=_evaluate_multi_label, export_outputs=_multi_label_outputs, crop_min_area=1.0,
)
METRIC_LEARNING = Task(
    name="metric_learning", description="an embedding per image, trained with a margin loss (--metric_loss) and "
    "scored by retrieval among the validation images, whose classes may be unseen in training",
    metrics=("recall_at_1", "recall_at_5", "recall_at_10", "map_at_r"), several_labels=False, target=_label_id,
    head=embedding_head, loss=_margin_loss, probabilities=_identity, evaluate=_evaluate_retrieval,
    export_outputs=_embedding_outputs, evaluated_layer="embedding", open_set=True,
    head_options=lambda c: {"embedding_size": c.embedding_size, "plain_classifier": c.loss_weight < 1},
    export_metadata=lambda c: {"embedding_size": c.embedding_size, "metric_loss": c.metric_loss},
)
TASKS = {task.name: task for task in (CLASSIFICATION, MULTI_LABEL, METRIC_LEARNING)}


def all_metrics():
    """Every metric some task reports for tuning (the study driver checks its metric against them)."""
    return tuple(dict.fromkeys(m for task in TASKS.values() for m in task.metrics))
