"""The exported SavedModel as seen by inference: loading it, and shaping its outputs.

Owns what trainer.predict (offline, PAI-style lines) and trainer.serve (TF
Serving's REST rows) share: `load()` returns the model's two signatures and
what the model says about itself (class names, task, image size) from its
`metadata` signature.
`pai_records()` and `rows()` turn one batch of signature outputs into one
JSON-ready dict per image.
"""

import dataclasses
import os

import numpy as np


class ModelError(Exception):
    """The model folder holds no usable SavedModel; reported as one line."""


@dataclasses.dataclass(frozen=True)
class Model:
    serve_bytes: object  # concrete function: image_bytes string [B] -> outputs
    serve_images: object  # concrete function: images uint8 [B, H, W, 3] -> outputs
    class_names: tuple
    task: str  # "classification" or "multi_label"
    image_size: int
    holder: object = None  # the loaded object; keeps the variables alive


def load(model_dir):
    import tensorflow as tf

    if not tf.io.gfile.exists(os.path.join(model_dir, "saved_model.pb")):
        raise ModelError(f"--model_dir={model_dir} holds no saved_model.pb; give the model/ folder of a job-dir")
    loaded = tf.saved_model.load(model_dir)
    missing = {"serving_default", "serving_images"} - set(loaded.signatures.keys())
    if missing:
        raise ModelError(f"--model_dir={model_dir} lacks the signatures {sorted(missing)}; export it with trainer.export")
    serve_images = loaded.signatures["serving_images"]
    if "metadata" not in loaded.signatures:
        raise ModelError(f"--model_dir={model_dir} has no metadata signature; re-export it with this version's trainer")
    meta = {k: v.numpy() for k, v in loaded.signatures["metadata"]().items()}
    names = tuple(n.decode("utf-8") for n in meta["class_names"])
    task, size = meta["task"].decode("utf-8"), int(meta["image_size"])
    return Model(loaded.signatures["serving_default"], serve_images, names, task, size, loaded)


def _numpy(outputs):
    return {key: value.numpy() if hasattr(value, "numpy") else np.asarray(value) for key, value in outputs.items()}


def pai_records(outputs, class_names):
    """One PAI EasyVision-style dict per image: class_probs, classes, class_names, probs (+ predictions).

    Single-label: classes/class_names are the model's top k. Multi-label: the
    ids whose `predictions` entry is true, most probable first.
    """
    out = _numpy(outputs)
    probabilities = out["probabilities"].astype(float)
    records = []
    for i, probs in enumerate(probabilities.tolist()):
        record = {"class_probs": dict(zip(class_names, probs))}
        if "predictions" in out:
            predicted = out["predictions"][i]
            order = np.argsort(-probabilities[i], kind="stable")
            ids = order[predicted[order]].tolist()
            record["predictions"] = predicted.tolist()
        else:
            ids = out["classes"][i].tolist()
        record["classes"] = ids
        record["class_names"] = [class_names[c] for c in ids]
        record["probs"] = probs
        records.append(record)
    return records


def rows(outputs):
    """TF Serving's row format: one {output name: value} dict per image, strings decoded."""
    out = _numpy(outputs)
    columns = {}
    for key, value in out.items():
        if value.dtype.kind in "SO":
            value = np.char.decode(value.astype(bytes), "utf-8", "replace")
        columns[key] = value.tolist()
    size = len(next(iter(columns.values()))) if columns else 0
    return [{key: column[i] for key, column in columns.items()} for i in range(size)]


def columns(outputs):
    """TF Serving's columnar format ({"inputs": ...} requests): {output name: [per-image values]}."""
    result = rows(outputs)
    return {key: [row[key] for row in result] for key in (result[0] if result else {})}
