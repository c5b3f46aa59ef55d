"""What a run tells the world: the progress line, the hypertune metrics file and
TensorBoard summaries (metrics.json is written by train.py through files.py).
"""

import json
import os
import time

def append_hypertune(path, metric_tag, value, step):
    """One line in cloudml-hypertune's format, for Vertex AI and hptuning.study."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    line = {
        "timestamp": time.time(),
        "trial": os.environ.get("CLOUD_ML_TRIAL_ID", "0"),
        metric_tag: str(value),
        "global_step": str(int(step)),
        "checkpoint_path": "",
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


class TensorBoard:
    """Scalars under logs/train and logs/validation; a no-op without TensorFlow."""

    def __init__(self, log_dir):
        """log_dir None: write nothing (a worker that is not the chief)."""
        try:
            import tensorflow as tf
        except ImportError:
            log_dir = None
        if log_dir is None:
            self._writers = None
            return
        self._tf = tf
        self._writers = {
            name: tf.summary.create_file_writer(os.path.join(log_dir, name)) for name in ("train", "validation")
        }

    def scalars(self, split, step, values):
        if self._writers is None:
            return
        with self._writers[split].as_default():
            for name, value in values.items():
                self._tf.summary.scalar(name, value, step=int(step))
        self._writers[split].flush()


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step, max_steps, data_loss, weight_decay, learning_rate, images_per_second, eta_seconds):
    """One self-contained line per report: readable live and in a log file.

    The training loss is shown as its two parts: the data's (comparable with an
    evaluation's loss) and the weight-decay term added to it.
    """
    width = len(str(max_steps))
    decay = f" + weight decay {weight_decay:.4f}" if weight_decay else ""
    return (
        f"step {step:>{width}}/{max_steps}  loss {data_loss:.4f}{decay}  lr {learning_rate:.3g}  "
        f"{images_per_second:,.0f} img/s  eta {format_duration(eta_seconds)}"
    )
