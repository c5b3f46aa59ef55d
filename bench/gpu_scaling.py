"""Data-parallel scaling of the trainer's step on every GPU of one host, by where the batch comes from.

Runs bench/gpu_throughput.py (ResNet-50 by default, batch 256 per GPU, bf16,
JAX) once on one GPU and once on all of them for each input path, in one
call, and records one table (bench/results/gpu-scaling.json):

  host, trainer  the batch in host memory, placed on the devices two steps
                 ahead (distribute.placed_ahead), as the trainer feeds fit
  host, trainer, global batch norm
                 the same with --sync_batch_norm: each layer's statistics
                 over the global batch, synchronised across the devices
  host, keras    the same batch, placed by fit when its step asks for it
  device         the batch generated on the GPUs once: no copy at all
  host, trainer, one process per GPU
                 the trainer with one process per GPU (TF_CONFIG naming them,
                 as PyTorch DDP runs): each holds its GPU's share of the batch
                 and fit assembles the global batch when its step asks (the
                 trainer places batches ahead only within one process); its
                 one-GPU figure is the first row's

Scaling efficiency = img/s on N GPUs / (N x img/s on one GPU fed the same way).
--anchor: only the trainer's own path, against timm + torch.compile under
PyTorch DDP on 1 and N GPUs (bench/timm_ddp_anchor.py, images on the GPU),
in a second table (bench/results/gpu-scaling-anchor-MODEL.json).
--pairs N: only the trainer's own path, N times one GPU then all of them,
alternating, each pair's scaling efficiency and the median of the N
(bench/results/gpu-scaling-pairs-MODEL.json): one pair's figure moves by
about 2 points from call to call, as much as a change being measured.

    KERAS_BACKEND=jax python bench/gpu_scaling.py [--model_type resnet-50] [--steps 150] [--anchor | --pairs N]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench import results  # noqa: E402  (found through the path above)
PATHS = (("host", "trainer", ()), ("host", "trainer", ("--sync_batch_norm",)), ("host", "keras", ()),
         ("device", "trainer", ()))
TIMM_NAMES = {"resnet-50": "resnet50", "efficientnet-b0": "efficientnet_b0"}


def throughput_command(input_path, placement, args, log, extra=()):
    """gpu_throughput's command line for one data-parallel run, appending its JSON result to log."""
    return [sys.executable, os.path.join(HERE, "gpu_throughput.py"), "--model_type", args.model_type,
            "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--image_size", str(args.image_size),
            "--input", input_path, "--placement", placement, "--data_parallel", "--json", log, *extra]


def run(devices, input_path, placement, args, log, extra=()):
    """One gpu_throughput run on the first `devices` GPUs (extra: more of its flags); its JSON result."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(devices)))
    command = throughput_command(input_path, placement, args, log, extra)
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    if finished.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    with open(log) as f:
        return json.loads(f.readlines()[-1])


def run_processes(processes, args, log):
    """The trainer's path with one process per GPU (a TF_CONFIG cluster on this host); the first process's
    JSON result (it steps with the others, over the global batch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addresses = [f"127.0.0.1:{port}"] + [f"127.0.0.1:{port + i}" for i in range(1, processes)]  # the first coordinates
    command = throughput_command("host", "trainer", args, log)
    started = []
    for index in range(processes):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(index), TF_CONFIG=json.dumps(
            {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}))
        started.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in started]
    for process, error in zip(started, errors):
        if process.returncode:
            sys.exit(f"{' '.join(command)} (one process per GPU) failed:\n{error[-3000:]}")
    with open(log) as f:
        return json.loads(f.readlines()[-1])


def timm_ddp(devices, model_type, plain=False):
    """img/s of timm + torch.compile under DDP on the first `devices` GPUs (all of them together);
    plain: on the first GPU alone, started without torchrun, so no process group and no DDP wrapper."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
    launcher = [] if plain else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}"]
    command = [sys.executable, *launcher, os.path.join(HERE, "timm_ddp_anchor.py"), TIMM_NAMES[model_type]]
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("ANCHOR ")]
    if finished.returncode or not lines:
        sys.exit(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    return float(lines[-1].split()[-1])


def gpu_count():
    listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return len([line for line in listed.stdout.splitlines() if line.strip()])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_type", default="resnet-50")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=256, help="per GPU")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--anchor", action="store_true", help="the trainer's path against timm DDP instead")
    parser.add_argument("--pairs", type=int, default=0, help="the trainer's path only, this many alternating pairs")
    args = parser.parse_args()
    gpus = gpu_count()
    if gpus < 2:
        sys.exit("error: this host has fewer than 2 GPUs; scaling needs several")
    if args.anchor:
        return anchor(args, gpus)
    if args.pairs:
        return pairs(args, gpus)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        log = os.path.join(scratch, "runs.jsonl")
        for input_path, placement, extra in PATHS:
            one = run(1, input_path, placement, args, log, extra)
            many = run(gpus, input_path, placement, args, log, extra)
            label = (f"{input_path}, {placement}" if input_path == "host" else input_path) + (
                ", global batch norm" if extra else "")
            rows.append([args.model_type, label, round(one["img_per_s"]), round(one["step_ms"], 1), gpus,
                         round(many["img_per_s"]), round(many["step_ms"], 1),
                         f"{100 * many['img_per_s'] / (gpus * one['img_per_s']):.1f}%"])
            print(rows[-1], flush=True)
        one = rows[0][2]
        many = run_processes(gpus, args, log)
        rows.append([args.model_type, "host, trainer, one process per GPU", one, rows[0][3], gpus,
                     round(many["img_per_s"]), round(many["step_ms"], 1),
                     f"{100 * many['img_per_s'] / (gpus * one):.1f}%"])
        print(rows[-1], flush=True)
    results.record(f"gpu-scaling-{args.model_type}", [
        "model", "input", "1 GPU img/s", "step ms", "GPUs", "img/s", "step ms", "scaling efficiency"], rows)


def pairs(args, gpus):
    import statistics

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        log = os.path.join(scratch, "runs.jsonl")
        for pair in range(1, args.pairs + 1):
            one, many = (run(n, "host", "trainer", args, log)["img_per_s"] for n in (1, gpus))
            rows.append([args.model_type, pair, round(one), gpus, round(many), f"{100 * many / (gpus * one):.1f}%"])
            print(rows[-1], flush=True)
    ones, manys = [row[2] for row in rows], [row[4] for row in rows]
    efficiencies = [float(row[5].rstrip("%")) for row in rows]
    rows.append([args.model_type, "median", round(statistics.median(ones)), gpus, round(statistics.median(manys)),
                 f"{statistics.median(efficiencies):.1f}%"])
    results.record(f"gpu-scaling-pairs-{args.model_type}", [
        "model", "pair", "1 GPU img/s (host input)", "GPUs", "img/s", "scaling efficiency"], rows)


def anchor(args, gpus):
    with tempfile.TemporaryDirectory() as scratch:
        log = os.path.join(scratch, "runs.jsonl")
        ours = [run(n, "host", "trainer", args, log)["img_per_s"] for n in (1, gpus)]
    print("ours", ours, flush=True)
    timm = []
    for n in (1, gpus):
        timm.append(timm_ddp(n, args.model_type))
        print("timm", n, timm[-1], flush=True)
    rows = [[args.model_type, n, round(o), round(t), f"{o / t:.2f}",
             f"{100 * o / (n * ours[0]):.1f}%", f"{100 * t / (n * timm[0]):.1f}%"]
            for n, o, t in zip((1, gpus), ours, timm)]
    results.record(f"gpu-scaling-anchor-{args.model_type}", [
        "model", "GPUs", "ours img/s (host input)", "timm DDP + torch.compile img/s (on the GPU)", "ours / timm",
        "our scaling efficiency", "timm's"], rows)


if __name__ == "__main__":
    main()
