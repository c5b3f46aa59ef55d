"""How many classes a metric-learning head trains with on one GPU and on two (--classifier_parallelism=model).

Builds what the trainer builds for `--task=metric_learning` (models.build_model
with the task's neck and margins.MarginHead, margins.margin_loss, SGD with
momentum, compile_model) under margins.model_parallel(devices): the head's
class centres split by class over the devices, the backbone data parallel. It
trains on a synthetic uint8 batch kept on the devices, with labels spread over
every class. Runs with KERAS_BACKEND=jax; TensorFlow is not needed.

One attempt (prints one JSON line; exit 0 when it trained, 3 when it ran out of memory):

    KERAS_BACKEND=jax python bench/gpu_classes.py --classes 1000000 --devices 2

The search (each attempt in its own process, so an out-of-memory leaves nothing
behind): classes doubled from --start until an attempt fails, then bisected
--bisect times; then img/s at --rate_classes on each device count; a table:

    KERAS_BACKEND=jax python bench/gpu_classes.py --search --devices 1,2
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import results  # noqa: E402  (found through the path above)

OUT_OF_MEMORY = 3
LABEL_LIMIT = 1 << 24  # config.LARGEST_LABEL_ID: the trainer refuses more classes (float32 label ids)


def attempt(a):
    """Trains a few steps with a.classes classes on a.devices devices; returns the result dict."""
    import jax
    import keras

    from bench.gpu_throughput import EpochTimer, peak_memory_gib, repeat
    from trainer import margins, models
    from trainer.tasks import METRIC_LEARNING

    devices = keras.distribution.list_devices()[:a.devices]
    if len(devices) > 1:  # as the trainer does: one device holds the whole head without a distribution
        keras.distribution.set_distribution(margins.model_parallel(devices))
    keras.mixed_precision.set_dtype_policy(a.precision)
    batch = a.batch_size * a.devices
    head = lambda features, num_classes: METRIC_LEARNING.head(features, num_classes, embedding_size=a.embedding_size)
    model = models.build_model(a.model_type, a.classes, a.image_size, weight_decay=5e-4, seed=0, head=head)
    models.compile_model(model, models.make_optimizer("momentum", 0.01),
                         margins.margin_loss(a.metric_loss, a.classes))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, a.image_size, a.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, a.classes, (batch, 1)).astype(np.int32)
    timer = EpochTimer()
    started = time.perf_counter()
    model.fit(repeat((images, labels)), steps_per_epoch=a.warmup_steps, epochs=1, verbose=0, callbacks=[timer])
    result = {"classes": a.classes, "devices": a.devices, "batch": batch, "embedding": a.embedding_size,
              "precision": a.precision, "model_type": a.model_type, "device": jax.devices()[0].device_kind,
              "first_epoch_s": timer.ends[0] - started, "loss": float(timer.loss)}
    if a.steps:  # the compiled step again (fit keeps it), timed
        timer = EpochTimer()
        model.fit(repeat((images, labels)), steps_per_epoch=a.steps, epochs=1, verbose=0, callbacks=[timer])
        result["img_per_s"] = batch * a.steps / (timer.ends[0] - timer.starts[0])
    result["peak_mem_gib"] = peak_memory_gib()
    return result


def run_attempt(a, classes, devices, timed):
    """One attempt in a child process: (trained, result or None)."""
    argv = [sys.executable, os.path.abspath(__file__), f"--classes={classes}", f"--devices={devices}",
            f"--batch_size={a.batch_size}", f"--embedding_size={a.embedding_size}", f"--precision={a.precision}",
            f"--model_type={a.model_type}", f"--image_size={a.image_size}", f"--metric_loss={a.metric_loss}",
            f"--warmup_steps={a.warmup_steps}", f"--steps={a.steps if timed else 0}"]
    child = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else None
    state = "trained" if child.returncode == 0 else "out of memory" if child.returncode == OUT_OF_MEMORY else "failed"
    print(f"  {devices} device(s), {classes:,} classes: {state}"
          + (f", peak {result['peak_mem_gib']:.1f} GiB" if result and "peak_mem_gib" in result else "")
          + ("" if child.returncode in (0, OUT_OF_MEMORY) else "\n" + child.stderr[-2000:]), flush=True)
    return child.returncode == 0, result


def largest(a, devices):
    """The largest class count (a multiple of devices) that trained, and the smallest that did not (or None)."""
    good, bad, classes = 0, None, a.start
    while good < LABEL_LIMIT:
        if not run_attempt(a, classes, devices, timed=False)[0]:
            bad = classes
            break
        good, classes = classes, min(classes * 2, LABEL_LIMIT)  # the last try: the limit itself
    for _ in range(a.bisect if bad else 0):
        middle = (good + bad) // 2 // devices * devices
        if middle in (good, bad):
            break
        if run_attempt(a, middle, devices, timed=False)[0]:
            good = middle
        else:
            bad = middle
    return good, bad


def search(a):
    rows = []
    for devices in (int(d) for d in a.devices_list.split(",")):
        good, bad = largest(a, devices)
        _, rate = run_attempt(a, a.rate_classes, devices, timed=True)
        rows.append((devices, good, bad, rate))
    header = ["devices", "largest class count that trained", "smallest that did not",
              f"img/s at {a.rate_classes:,} classes", "peak GiB there"]
    table = []
    for devices, good, bad, rate in rows:
        failed = f"{bad:,}" if bad else f"none up to {LABEL_LIMIT:,} (the trainer's label limit)"
        table.append([devices, good, failed, round(rate["img_per_s"]) if rate else "failed",
                      round(rate["peak_mem_gib"], 1) if rate else None])
    results.record(f"gpu-classes-{a.model_type}-{a.metric_loss}", header, table)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--search", action="store_true")
    p.add_argument("--devices", default="1", help="devices for one attempt; a comma list with --search")
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--start", type=int, default=1_000_000, help="--search: the first class count tried")
    p.add_argument("--bisect", type=int, default=2, help="--search: halvings between the last good and first bad")
    p.add_argument("--rate_classes", type=int, default=1_000_000)
    p.add_argument("--batch_size", type=int, default=256, help="per device")
    p.add_argument("--embedding_size", type=int, default=512)
    p.add_argument("--precision", default="mixed_bfloat16")
    p.add_argument("--model_type", default="resnet-50")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--metric_loss", default="amsoftmax")
    p.add_argument("--warmup_steps", type=int, default=3, help="steps of the first, untimed epoch (compiles)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after it (an attempt: 0 = none)")
    a = p.parse_args()
    if a.search:
        a.devices_list = a.devices
        return search(a)
    a.devices = int(a.devices)
    try:
        result = attempt(a)
    except Exception as e:  # the search needs to tell out-of-memory from other failures
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            print(json.dumps({"classes": a.classes, "devices": a.devices, "error": "out of memory"}))
            sys.exit(OUT_OF_MEMORY)
        raise
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
