"""The trainer's step against plain timm + torch.compile on one GPU, in one call.

Runs bench/gpu_throughput.py (the trainer's own step, JAX, bf16, batch 256,
1,000 classes) with the batch on the GPU and with the batch copied from host
memory each step, then bench/timm_ddp_anchor.py without torchrun (the same
step in timm + torch.compile, no DDP wrapper, images on the GPU), and records
bench/results/gpu-vs-timm-MODEL.json. The ratio compares the two runs with
the images on the GPU; both figures come from the same call, as ratios must.

    KERAS_BACKEND=jax python bench/gpu_vs_timm.py --model_type resnet-50 [--steps 150] [--inference]

Each model takes a call of its own: ResNet-50 about four minutes (our two
runs, then torch.compile and timm's steps); EfficientNet-B0 longer, since
torch.compile of it alone takes minutes (a 320 s call ended before timm
finished): give it the whole 600 s of a call.
"""

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench import gpu_scaling, results  # noqa: E402  (found through the path above)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_type", default="resnet-50", choices=sorted(gpu_scaling.TIMM_NAMES))
    parser.add_argument("--steps", type=int, default=150)
    parser.set_defaults(batch_size=256, image_size=224)  # what the timm anchor runs
    parser.add_argument("--inference", action="store_true", help="also time our forward pass")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        log = os.path.join(scratch, "runs.jsonl")
        extra = ["--inference"] if args.inference else []
        device = gpu_scaling.run(1, "device", "trainer", args, log, extra)
        host = gpu_scaling.run(1, "host", "trainer", args, log)
    print("ours", device["img_per_s"], host["img_per_s"], flush=True)
    timm = gpu_scaling.timm_ddp(1, args.model_type, plain=True)
    print("timm", timm, flush=True)
    results.record(f"gpu-vs-timm-{args.model_type}", [
        "model", "GPU", "ours img/s (images on the GPU)", "ours img/s (from host memory)",
        "timm + torch.compile img/s (on the GPU)", "ours / timm", "our inference img/s"], [[
        args.model_type, device["device"], round(device["img_per_s"]), round(host["img_per_s"]), round(timm),
        f"{device['img_per_s'] / timm:.2f}",
        round(device["inference_img_per_s"]) if "inference_img_per_s" in device else None]])


if __name__ == "__main__":
    main()
