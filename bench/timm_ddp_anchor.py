"""The anchor for data-parallel scaling (issue 6): timm + torch.compile under
PyTorch DistributedDataParallel, one process per GPU, the same step as the
single-GPU anchor (../shared/bench/gpu_anchor.py): SGD momentum 0.9, weight
decay 1e-4, label smoothing 0.1, bf16 autocast, channels_last, synthetic uint8
images already on the GPU, per-GPU batch 256.

    torchrun --standalone --nproc_per_node=2 bench/timm_ddp_anchor.py resnet50

Run without torchrun (no RANK in the environment) it is the plain one-GPU
anchor: the same step on the first GPU, no process group and no DDP wrapper,
as a user training on one GPU runs it.

    python bench/timm_ddp_anchor.py resnet50

Rank 0 prints one line: `ANCHOR arch gpus img/s` (all GPUs together).
"""

import os
import sys
import time

import torch
import torch.distributed as dist
import timm

BATCH = int(os.environ.get("BS", 256))
STEPS = int(os.environ.get("STEPS", 30))
WARMUP = int(os.environ.get("WARM", 8))


def main(arch):
    distributed = "RANK" in os.environ  # started by torchrun
    if distributed:
        dist.init_process_group("nccl")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = timm.create_model(arch, num_classes=1000).cuda().to(memory_format=torch.channels_last)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator(device="cuda").manual_seed(rank)
    images = torch.randint(0, 255, (BATCH, 3, 224, 224), dtype=torch.uint8, device="cuda", generator=generator)
    labels = torch.randint(0, 1000, (BATCH,), device="cuda", generator=generator)
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1) * 255

    def step():
        x = ((images.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    compiled = torch.compile(step)
    for _ in range(WARMUP):
        compiled()
    torch.cuda.synchronize()
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(STEPS):
        compiled()
    torch.cuda.synchronize()
    if distributed:
        dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"ANCHOR {arch} {world} {world * BATCH * STEPS / elapsed:.1f}", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet50")
