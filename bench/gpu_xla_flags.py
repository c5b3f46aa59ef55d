"""The trainer's step under several XLA_FLAGS settings, one process each, in one call.

Each argument after -- is one setting (a string of XLA flags; "" is XLA's defaults).
Runs bench/gpu_throughput.py (images on the GPU, or from the host with
--input host) on the first --gpus GPUs with XLA_FLAGS set to it, and records
bench/results/gpu-xla-flags-MODEL-Ngpu.json: img/s, step time and the ratio to
the first setting. A setting XLA refuses is a row that says so.

    KERAS_BACKEND=jax python bench/gpu_xla_flags.py --model_type resnet-50 -- "" \\
        "--xla_gpu_enable_command_buffer=" "--xla_gpu_enable_latency_hiding_scheduler=true"
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench import results  # noqa: E402  (found through the path above)


def measure(flags, args, log):
    """gpu_throughput's JSON result with XLA_FLAGS=flags, or None when the run failed (its error printed)."""
    env = dict(os.environ, XLA_FLAGS=flags, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(args.gpus)))
    command = [sys.executable, os.path.join(HERE, "gpu_throughput.py"), "--model_type", args.model_type,
               "--steps", str(args.steps), "--input", args.input, "--data_parallel", "--json", log]
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    if finished.returncode:
        print(f"XLA_FLAGS={flags!r} failed:\n{finished.stderr[-1500:]}", flush=True)
        return None
    with open(log) as f:
        return json.loads(f.readlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help='XLA_FLAGS values, "" for the defaults')
    parser.add_argument("--model_type", default="resnet-50")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--input", default="device", choices=("device", "host"))
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    rows, first = [], None
    with tempfile.TemporaryDirectory() as scratch:
        for flags in args.settings:
            result = measure(flags, args, os.path.join(scratch, "runs.jsonl"))
            rate = result["img_per_s"] if result else None
            first = rate if first is None and flags == args.settings[0] else first
            rows.append([flags or "(XLA's defaults)", round(rate) if rate else "failed",
                         round(result["step_ms"], 1) if result else None,
                         f"{rate / first:.3f}" if rate and first else None])
            print(rows[-1], flush=True)
    results.record(f"gpu-xla-flags-{args.model_type}-{args.gpus}gpu",
                   ["XLA_FLAGS", "img/s", "step ms", "ratio to the first"], rows)


if __name__ == "__main__":
    main()
