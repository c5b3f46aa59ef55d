"""The exported SavedModel as seen by serving: loading it, and shaping its outputs.

Owns what trainer.serving.predict (offline, PAI-style lines) and
trainer.serving.serve (TF Serving's REST rows) share: `load()` returns the
model's two signatures and what the model says about itself (class names,
task, image size) from its `metadata` signature; given a folder of numbered
versions (TF Serving's base path, SageMaker's /opt/ml/model/1), it loads the
highest. `pai_records()` and `rows()` turn one batch of signature outputs
into one JSON-ready dict per image. Both
follow the outputs the export returns; none of it asks which task the model
does (the task is only shown to users).
"""

import dataclasses
import os

import numpy as np

from trainer.cli import UserError

# Outputs every export has (trainer/export.py); the PAI record builds its own fields from them.
_SHAPED = ("probabilities", "classes", "scores", "class_names")


@dataclasses.dataclass(frozen=True)
class Model:
    serve_bytes: object  # concrete function: image_bytes string [B] -> outputs
    serve_images: object  # concrete function: images uint8 [B, H, W, 3] -> outputs
    class_names: tuple
    task: str  # the --task that trained it, for display
    image_size: int
    holder: object = None  # the loaded object; keeps the variables alive
    version: str = "1"  # the numbered folder it came from, else 1
    path: str = ""  # the folder holding saved_model.pb


def find_version(model_dir):
    """(folder holding saved_model.pb, version): model_dir itself as version 1, else, as TF Serving reads a
    base path, its highest numbered subfolder; (model_dir, "1") when neither holds a model."""
    import tensorflow as tf

    if tf.io.gfile.exists(os.path.join(model_dir, "saved_model.pb")) or not tf.io.gfile.isdir(model_dir):
        return model_dir, "1"
    versions = {int(name): name for name in (n.rstrip("/") for n in tf.io.gfile.listdir(model_dir)) if name.isdigit()}
    if not versions:
        return model_dir, "1"
    latest = max(versions)
    return os.path.join(model_dir, versions[latest]), str(latest)


def load(model_dir):
    """The SavedModel at model_dir (or its latest version); a UserError naming --model_dir when it is not one
    this trainer exported."""
    import tensorflow as tf

    model_dir, version = find_version(model_dir)
    if not tf.io.gfile.exists(os.path.join(model_dir, "saved_model.pb")):
        raise UserError(f"--model_dir={model_dir} holds no saved_model.pb; give the model/ folder of a job-dir "
                        "(or a folder of numbered versions of it)")
    loaded = tf.saved_model.load(model_dir)
    missing = {"serving_default", "serving_images"} - set(loaded.signatures.keys())
    if missing:
        raise UserError(f"--model_dir={model_dir} lacks the signatures {sorted(missing)}; export it with trainer.export")
    if "metadata" not in loaded.signatures:
        raise UserError(f"--model_dir={model_dir} has no metadata signature; re-export it with this version's trainer")
    meta = {k: v.numpy() for k, v in loaded.signatures["metadata"]().items()}
    names = tuple(n.decode("utf-8") for n in meta["class_names"])
    task, size = meta["task"].decode("utf-8"), int(meta["image_size"])
    return Model(loaded.signatures["serving_default"], loaded.signatures["serving_images"], names, task, size, loaded,
                 version, model_dir)


def _numpy(outputs):
    return {key: value.numpy() if hasattr(value, "numpy") else np.asarray(value) for key, value in outputs.items()}


def _lists(value):
    """An output as nested Python lists, strings decoded."""
    if value.dtype.kind in "SO":
        value = np.char.decode(value.astype(bytes), "utf-8", "replace")
    return value.tolist()


def pai_records(outputs, class_names):
    """One PAI EasyVision-style dict per image: class_probs, [per-class outputs,] classes, class_names, probs
    (an embedding model's: {"embedding": [D floats]}).

    class_probs and probs come from `probabilities`; any other per-class output
    of the export (a multi-label model's boolean `predictions`) is copied under
    its own name; classes are the ids of the export's `classes` output, without
    its -1 padding, in its order (a classifier's top k, a multi-label model's
    predicted classes, most probable first).
    """
    out = _numpy(outputs)
    if "embeddings" in out:  # an embedding model (metric learning): its vector, nothing per class
        return [{"embedding": row} for row in out["embeddings"].astype(float).tolist()]
    probabilities = out["probabilities"].astype(float).tolist()
    per_class = sorted(key for key, value in out.items()
                       if key not in _SHAPED and value.ndim == 2 and value.shape[1] == len(class_names))
    extras = {key: _lists(out[key]) for key in per_class}
    records = []
    for i, probs in enumerate(probabilities):
        record = {"class_probs": dict(zip(class_names, probs))}
        record.update((key, values[i]) for key, values in extras.items())
        ids = [c for c in out["classes"][i].tolist() if c >= 0]
        record["classes"] = ids
        record["class_names"] = [class_names[c] for c in ids]
        record["probs"] = probs
        records.append(record)
    return records


def rows(outputs):
    """TF Serving's row format: one {output name: value} dict per image, strings decoded."""
    columns = {key: _lists(value) for key, value in _numpy(outputs).items()}
    size = len(next(iter(columns.values()))) if columns else 0
    return [{key: column[i] for key, column in columns.items()} for i in range(size)]


def columns(outputs):
    """TF Serving's columnar format ({"inputs": ...} requests): {output name: [per-image values]}."""
    result = rows(outputs)
    return {key: [row[key] for row in result] for key in (result[0] if result else {})}
