"""SavedModel export: the model a server loads, with preprocessing inside.

Signatures:
  serving_default(image_bytes: string [B])    encoded JPEG/PNG/GIF/BMP bytes
  serving_images(images: uint8 [B, H, W, 3])  decoded RGB images, any size
  metadata()                                  class_names [C], task, image_size (and the task's own:
                                              metric learning's embedding_size and metric_loss)
The outputs are the task's (tasks.py): a classifier returns probabilities
[B, C] (softmax) and the top-k (k = min(5, C)) classes, scores and
class_names [B, k]; a multi-label model returns sigmoid probabilities [B, C],
predictions (bool [B, C], the best evaluation's per-class thresholds applied),
and classes / scores / class_names [B, C] ordered by probability, the
predicted ones first, the rest padded with -1 / 0 / ""; a metric-learning model returns
embeddings [B, D], L2-normalised. The metadata names
the task, so serving code reads it instead of guessing.
Bytes get exactly the evaluation crop; uint8 images are resized whole. The
SavedModel is always written by the TensorFlow backend (from a weights file)
so it loads on plain CPU TensorFlow whatever trained it: a JAX run exports in
a child process (`python -m trainer.export SPEC.json`).
"""

import contextlib
import dataclasses
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from trainer import files
from trainer.tasks import TASKS


@dataclasses.dataclass(frozen=True)
class Exported:
    """What an export took: wall seconds, CPU seconds (every thread, and the child process of a JAX run), bytes."""

    seconds: float
    cpu_seconds: float
    size: int

    IDLE_S = 3.0  # an export waiting this long with the CPU idle, and for most of its time, says so

    def line(self):
        """The log line: time and size, and the wait when the CPU sat idle for most of it (slow storage)."""
        text = f"exported in {self.seconds:.1f} s ({self.size / 1e6:.0f} MB)"
        idle = self.seconds - self.cpu_seconds
        if idle >= self.IDLE_S and idle > self.seconds / 2:
            text += (f"; the CPU was idle for {idle:.1f} s of it, waiting for the disk (or, for gs://, the network) "
                     f"to take the files: {self.size / 1e6 / self.seconds:.1f} MB/s")
        return text


def export_saved_model(weights_path, model_type, task, num_classes, image_size, class_names, export_dir,
                       evaluation=None, head_options=None, metadata=None):
    """Builds the model from weights_path and writes export_dir, replacing it atomically; returns Exported.

    task: a --task name; evaluation: the evaluation whose settings the export
    keeps (a multi-label model's thresholds); head_options: the task head's
    keyword arguments (Task.head_options); metadata: {name: str or int} the
    metadata signature returns besides class_names, task and image_size.
    The export's files reach the disk before it returns (files.write_folder_atomic),
    so on slow storage most of its time is the wait for them, which Exported.line() names.
    """
    import keras

    spec = dict(weights_path=weights_path, model_type=model_type, task=task, num_classes=num_classes,
                image_size=image_size, class_names=list(class_names), export_dir=export_dir,
                evaluation=evaluation or {}, head_options=head_options or {}, metadata=metadata or {})
    started, cpu_before = time.perf_counter(), _cpu_seconds()
    if keras.backend.backend() != "tensorflow":
        _export_in_child(spec)  # which watches itself
    else:
        with stacks_if_slow(export_dir):
            _export(**spec)
    return Exported(time.perf_counter() - started, _cpu_seconds() - cpu_before, files.tree_bytes(export_dir))


def _cpu_seconds():
    """CPU seconds of this process's threads and of its finished children."""
    return sum(value for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for value in resource.getrusage(who)[:2])


STALL_SECONDS = 15  # an export takes about 1.5 s (docs/BENCHMARKS.md); one past this has stalled, and says where


@contextlib.contextmanager
def stacks_if_slow(export_dir):
    """Writes every thread's stack beside a local export_dir if the export is still running after
    STALL_SECONDS (once, an export took 41 s with the CPU idle and no way to tell why).

    A timer thread takes the stacks with the interpreter lock held (sys._current_frames), so it is safe
    while other threads start and end; faulthandler's watchdog reads them without the lock, and crashed
    a test process doing so.
    """
    if files.is_remote(export_dir):
        yield
        return
    path = os.path.join(os.path.dirname(os.path.abspath(export_dir)), "export-stall-stacks.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    timer = threading.Timer(STALL_SECONDS, _write_stacks, [path])
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a dump in progress finishes before the export returns
    if os.path.exists(path):
        from trainer import cli

        cli.say(f"the export took more than {STALL_SECONDS} s; the threads' stacks at that moment are in {path}")


def _write_stacks(path):
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    text = "".join(f"Thread {names.get(ident, ident)} (most recent call last):\n" + "".join(traceback.format_stack(frame))
                   + "\n" for ident, frame in sys._current_frames().items())
    files.write_atomic(path, text)


def _export(*, weights_path, model_type, task, num_classes, image_size, class_names, export_dir, evaluation,
            head_options, metadata):
    import keras
    import tensorflow as tf

    from trainer import images, models

    # Served on CPUs: float32 whatever precision trained it.
    keras.mixed_precision.set_dtype_policy("float32")
    model = models.build_model(model_type, num_classes, image_size, one_pass_moments=False,
                               head=functools.partial(TASKS[task].head, **head_options))
    model.load_weights(weights_path)
    served = TASKS[task].evaluated_model(model)  # the logits, or metric learning's embedding
    names = tf.constant(list(class_names))
    task_outputs = TASKS[task].export_outputs

    def outputs(uint8_images):
        return task_outputs(served(uint8_images, training=False), names, evaluation or {})

    def serve_bytes(image_bytes):
        decoded = tf.map_fn(
            lambda encoded: images.eval_image(encoded, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
        )
        return outputs(decoded)

    def serve_images(uint8_images):
        resized = tf.image.resize(uint8_images, [image_size, image_size], method="bilinear")
        return outputs(tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8))

    archive = keras.export.ExportArchive()
    # The endpoints track the variables they use. archive.track(model) would add the
    # model's own variable list, and the SavedModel would hold every weight twice.
    # TF Serving's REST API base64-decodes inputs whose name ends in _bytes.
    archive.add_endpoint("serving_default", serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("serving_images", serve_images, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    about = {"class_names": names, "task": tf.constant(task), "image_size": tf.constant(image_size),
             **{name: tf.constant(value) for name, value in metadata.items()}}
    archive.add_endpoint("metadata", lambda: about, input_signature=[])
    files.write_folder_atomic(export_dir, lambda tmp: archive.write_out(tmp, verbose=False))


def _export_in_child(spec):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:  # local even for a gs:// job-dir
        json.dump(spec, f)
    # The child needs no GPU: leave the devices to the JAX process that waits for it.
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "trainer.export", f.name], env=env, capture_output=True, text=True)
    os.remove(f.name)
    if result.returncode != 0:
        raise RuntimeError(f"SavedModel export failed:\n{result.stderr[-4000:]}")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        export_saved_model(**json.load(f))
