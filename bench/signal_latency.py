"""How long a trainer takes to stop after SIGTERM: the step in flight, the checkpoint at it, the exit.

Starts `python -m trainer.task` on a few tiny images with a large model
(ResNet-50 at 224 by default, evaluation every 100,000 steps, so nothing but
the signal can save a checkpoint), waits for its 4th progress line, sends
SIGTERM and times the exit; records the step times, the latency, the exit
status and the checkpoint's size (bench/results/signal-latency.json).

    python bench/signal_latency.py [--model_type resnet-50 --image_size 224 --batch 2]
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import results  # noqa: E402  (found through the path above)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_type", default="resnet-50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    from tests.conftest import tiny_flags, write_tfrecords

    work = tempfile.mkdtemp(prefix="signal-latency-")
    train = write_tfrecords(os.path.join(work, "train"), per_class=16)
    flags = tiny_flags(train, train, os.path.join(work, "run"), model_type=args.model_type, image_size=args.image_size,
                       train_batch_size=args.batch, eval_batch_size=args.batch, max_steps=100_000,
                       eval_frequency=100_000, log_frequency=1, max_batch_fraction=0)
    env = dict(os.environ, PYTHONPATH=ROOT, CLOUD_ML_HP_METRIC_FILE=os.path.join(work, "hypertune.metrics"))
    proc = subprocess.Popen([sys.executable, "-m", "trainer.task", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    stamps = []
    for line in proc.stdout:
        progress = re.match(r"step\s+(\d+)/", line)
        if progress:
            stamps.append(time.perf_counter())
            if int(progress.group(1)) >= 4:
                break
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.communicate()
    latency = time.perf_counter() - sent
    folder = os.path.join(work, "run", "checkpoints")
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith("ckpt-"))
    steps = ", ".join(f"{b - a:.2f}" for a, b in zip(stamps, stamps[1:]))
    results.record("signal-latency", ("model", "batch", "step s", "SIGTERM to exit s", "exit status", "checkpoint MB"),
                   [(f"{args.model_type} at {args.image_size}", args.batch, steps, round(latency, 1), proc.returncode,
                     size >> 20)])


if __name__ == "__main__":
    main()
