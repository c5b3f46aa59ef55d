"""Training throughput of the trainer's own step on one accelerator (issue 5).

Drives exactly what trainer/train.py runs (models.build_model, make_optimizer,
compile_model, then keras `fit`) on synthetic uint8 images, and prints
img/s after warm-up, step time, peak device memory and the share of the
compute ceiling. Runs with KERAS_BACKEND=jax, TensorFlow not needed:

    KERAS_BACKEND=jax python bench/gpu_throughput.py --model_type resnet-50 \
        --batch_size 256 --precision mixed_bfloat16 --inference

--input device: the batch is generated on the device once and `fit` reads it
  from a generator (no host->device copy: the same setting as the timm anchor).
--input host: the batch lives in host memory and `fit` copies it every step
  (its own one-batch-ahead prefetch), as it does with a tf.data dataset.
--profile DIR: traces a few steps with the JAX profiler and prints where the
  device time goes (per kernel class and the largest kernels) and where each
  device idles (the gaps between its kernels, by the kernels either side),
  counting only the training step's own kernels; then each device's kernels
  per step and what runs after the step's last convolution or matmul; then,
  from the compiled step XLA dumps into DIR/hlo, each convolution's TFLOP/s
  and each fusion's GB/s and the kernels furthest below their kind's
  (bench/hlo_rates.py).
--digits FILE: instead of timing, trains on the digits sample (an .npz of
  8x8 images and labels) and prints the loss curve: a correctness check.
"""

import argparse
import gzip
import glob
import json
import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras

from bench import hlo_rates, results
from trainer import models
from trainer.backbones import BACKBONES
from trainer.tasks import CLASSIFICATION

NUM_CLASSES = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_type", default="resnet-50", choices=sorted(BACKBONES))
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--precision", default="mixed_bfloat16", choices=("float32", "mixed_bfloat16", "mixed_float16"))
    p.add_argument("--steps", type=int, default=150, help="timed steps, one epoch after the warm-up epoch")
    p.add_argument("--warmup_steps", type=int, default=5, help="steps of the first, untimed epoch (compiles)")
    p.add_argument("--steps_per_execution", type=int, default=1)
    p.add_argument("--bn_moments", default="auto", choices=("auto", "keras", "one_pass"),
                   help="keras: Keras' two-pass variance; auto: what build_model does by default")
    p.add_argument("--max_pool", default="auto", choices=("auto", "keras", "indexed"),
                   help="keras: Keras' max pool, differentiated by XLA's select-and-scatter; auto: what build_model "
                        "does by default (indexed on JAX: models._indexed_max_pool)")
    p.add_argument("--stem", default="auto", choices=("auto", "keras", "space_to_depth"),
                   help="keras: Keras' strided stem convolution; auto: what build_model does by default "
                        "(space_to_depth on JAX: models._space_to_depth_conv)")
    p.add_argument("--sync_batch_norm", action="store_true",
                   help="the trainer's --sync_batch_norm: statistics over the global batch, not each device's share")
    p.add_argument("--frozen_moving_stats", action="store_true",
                   help="diagnostic, not a trainer setting: batch norm never updates its moving mean and variance, "
                        "so over several devices the step has no cross-device mean of them to compute")
    p.add_argument("--moving_stats", default="auto", choices=("auto", "global"),
                   help="several devices: global: each step averages the batch norms' moving statistics over the "
                        "devices (the step before per-device moving averages); auto: what build_model does by default "
                        "(on one process: each device moves its own, models._keep_moving_stats_per_device)")
    p.add_argument("--conv_kernels", default="auto", choices=("auto", "recast"),
                   help="several devices: recast: the backward pass casts each convolution's kernel again (the step "
                        "before models._kernel_cast_once); auto: what build_model does by default")
    p.add_argument("--input", default="device", choices=("device", "host", "sharded"),
                   help="sharded: as device, but the batch already split over the devices the way the "
                        "distribution splits it (no per-step resharding)")
    p.add_argument("--placement", default="trainer", choices=("trainer", "keras"),
                   help="--input host over several devices: trainer: batches placed on the devices two steps ahead "
                        "(distribute.placed_ahead, as the trainer feeds fit); keras: fit places each when its step asks")
    p.add_argument("--inference", action="store_true", help="also time the forward pass (training=False)")
    p.add_argument("--profile", default="", help="folder for a JAX profiler trace of 3 steps")
    p.add_argument("--peak_tflops", type=float, default=790.0, help="bf16 dense peak used as the ceiling (H100: ~790 measured)")
    p.add_argument("--digits", default="", help=".npz with 8x8 digits: run the loss-curve check instead")
    p.add_argument("--digits_steps", type=int, default=300, help="training steps of the digits check")
    p.add_argument("--digits_lr", type=float, default=0.01, help="SGD learning rate of the digits check")
    p.add_argument("--save", default="", help="digits check: folder for the weights and held-out predictions")
    p.add_argument("--data_parallel", action="store_true",
                   help="the trainer's data-parallel set-up (trainer/distribute.py: keras.distribution DataParallel over "
                        "every visible device; pick them with CUDA_VISIBLE_DEVICES); --batch_size is then per device. "
                        "With TF_CONFIG naming several processes, this is one of them (--input host; each process "
                        "holds its devices' share of the batch; the first reports)")
    p.add_argument("--json", default="", help="append the result as one JSON line to this file")
    return p.parse_args(argv)


def synthetic_batch(batch_size, image_size, on_device, seed=0):
    """Random uint8 images and one-hot labels (never zeros: they can run faster than real data)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    labels = np.eye(NUM_CLASSES, dtype="float32")[rng.integers(0, NUM_CLASSES, batch_size)]
    if on_device:
        import jax

        images, labels = jax.device_put(images), jax.device_put(labels)
    return images, labels


def repeat(batch):
    while True:
        yield batch


def build(model_type, image_size, precision, steps_per_execution, num_classes=NUM_CLASSES, learning_rate=0.1, bn_moments="auto",
          sync_batch_norm=False, frozen_moving_stats=False, max_pool="auto", stem="auto", moving_stats="auto",
          conv_kernels="auto"):
    keras.mixed_precision.set_dtype_policy(precision)
    one_pass = {"auto": None, "keras": False, "one_pass": True}[bn_moments]
    indexed = {"auto": None, "keras": False, "indexed": True}[max_pool]
    model = models.build_model(model_type, num_classes, image_size, weight_decay=1e-4, seed=0, one_pass_moments=one_pass,
                               indexed_max_pool=indexed, space_to_depth_stem={"auto": None, "keras": False, "space_to_depth": True}[stem])
    if sync_batch_norm:  # the trainer's --sync_batch_norm
        models.set_synchronized_batch_norm(model)
    if moving_stats == "global":
        for layer in models._all_layers(model):
            models.moving_stats_on_the_layer(layer)
    if conv_kernels == "recast":
        for layer in models._all_layers(model):
            vars(layer).pop("convolution_op", None)  # Keras' own (models._kernel_cast_once undone)
    if frozen_moving_stats:
        for layer in models._all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.call = keeping_moving_stats(layer, layer.call)
    optimizer = models.make_optimizer("momentum", learning_rate)
    loss = CLASSIFICATION.loss(types.SimpleNamespace(label_smoothing=0.1))
    models.compile_model(model, optimizer, loss, steps_per_execution=steps_per_execution)
    return model


def keeping_moving_stats(layer, call):
    """layer's call, with its moving mean and variance put back as they were: the step computes no update of them."""

    def frozen(*args, **kwargs):
        before = [(v, v.value) for v in (layer.moving_mean, layer.moving_variance)]
        outputs = call(*args, **kwargs)
        for variable, value in before:
            variable.assign(value)
        return outputs

    return frozen


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch; Keras syncs the device state at every epoch end."""

    def __init__(self):
        super().__init__()
        self.starts, self.ends = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.starts.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter())
        self.loss = logs.get("loss")


def train_flops_per_image(model):
    """Training FLOPs per image of the convolutions and dense layers: 3 x forward.

    Forward = 2 x multiply-adds; backward = 2 x forward (data and weight
    gradients). Counted from layer shapes, so it needs no device.
    """
    macs = 0
    for layer in models._all_layers(model):
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            continue
        outputs = int(np.prod(layer.output.shape[1:]))
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            macs += outputs * int(np.prod(layer.kernel_size))
        elif isinstance(layer, keras.layers.Conv2D):
            macs += outputs * int(np.prod(layer.kernel_size)) * layer.input.shape[-1] // layer.groups
        else:
            macs += outputs * layer.input.shape[-1]
    return 3.0 * 2.0 * macs


def inference_images_per_second(model, batch, steps=20):
    import jax

    forward = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    for _ in range(3):
        forward(tv, ntv, batch).block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        out = forward(tv, ntv, batch)
    out.block_until_ready()
    return batch.shape[0] * steps / (time.perf_counter() - start)


def is_first_process():
    import jax

    return jax.process_index() == 0


def peak_memory_gib():
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def measure(a):
    import jax

    model = build(a.model_type, a.image_size, a.precision, a.steps_per_execution, bn_moments=a.bn_moments,
                  sync_batch_norm=a.sync_batch_norm, frozen_moving_stats=a.frozen_moving_stats, max_pool=a.max_pool,
                  stem=a.stem, moving_stats=a.moving_stats, conv_kernels=a.conv_kernels)
    # Several processes (TF_CONFIG): each holds its own devices' share of the global batch, as the trainer does.
    processes = jax.process_count()
    if processes > 1 and a.input != "host":
        sys.exit("error: several processes need --input host")
    batch = synthetic_batch(a.batch_size // processes, a.image_size, on_device=a.input != "host",
                            seed=jax.process_index())
    if a.input == "sharded" and keras.distribution.distribution() is not None:
        distribution = keras.distribution.distribution()
        batch = tuple(keras.distribution.distribute_tensor(t, distribution.get_data_layout(t.shape)) for t in batch)
    spe = a.steps_per_execution
    warmup, steps = (max(spe, -(-n // spe) * spe) for n in (a.warmup_steps, a.steps))  # whole executions
    batches = repeat(batch)
    if (a.input == "host" and a.placement == "trainer" and keras.distribution.distribution() is not None
            and processes == 1):  # several processes: fit assembles the global batch (distribute.training_input)
        from trainer import distribute

        batches = distribute.placed_ahead(batches, keras.distribution.distribution())
    # One untimed epoch that compiles, then the timed steps as one epoch: Keras waits for the device at
    # an epoch's end, so shorter epochs would drain the GPU every few steps (the trainer waits only at
    # a progress line; the anchors time their steps in one stretch too).
    compile_start = time.perf_counter()
    model.fit(batches, steps_per_epoch=warmup, epochs=1, verbose=0)
    first_epoch = time.perf_counter() - compile_start
    timer = EpochTimer()
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
    timed = timer.ends[0] - timer.starts[0]
    result = {
        "model_type": a.model_type, "batch_size": a.batch_size, "devices": a.devices, "precision": a.precision,
        "input": a.input, "placement": a.placement, "sync_batch_norm": a.sync_batch_norm,
        "frozen_moving_stats": a.frozen_moving_stats, "moving_stats": a.moving_stats,
        "conv_kernels": a.conv_kernels, "max_pool": a.max_pool, "stem": a.stem,
        "steps_per_execution": spe, "bn_moments": a.bn_moments, "device": jax.devices()[0].device_kind,
        "img_per_s": a.batch_size * steps / timed, "step_ms": 1e3 * timed / steps,
        "first_epoch_s": first_epoch, "peak_mem_gib": peak_memory_gib(), "last_loss": float(timer.loss),
    }
    print(json.dumps(result), flush=True)  # the headline figure first, whatever fails below
    try:
        flops = train_flops_per_image(model)
        result["train_gflop_per_img"] = flops / 1e9
        result["ceiling_share"] = result["img_per_s"] * flops / (a.devices * a.peak_tflops * 1e12)
    except Exception as e:  # noqa: BLE001 - a bench reports what it could measure
        print("flop count failed:", repr(e)[:300])
    if a.inference:
        device_batch = batch[0] if a.input != "host" else jax.device_put(batch[0])
        result["inference_img_per_s"] = inference_images_per_second(model, device_batch)
    if a.profile:
        try:
            profile(model, batches, a.profile)  # the same feed as the timed steps
        except Exception as e:  # noqa: BLE001
            print("profile failed:", repr(e)[:300])
    return result


def dump_compiled_step(folder):
    """Has XLA write the training step's compiled HLO under folder/hlo (for hlo_rates); only takes effect
    before JAX starts its backend."""
    flags = f"--xla_dump_to={os.path.join(folder, 'hlo')} --xla_dump_hlo_module_re=.*train_step.*"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def profile(model, batches, folder, steps=3):
    """Traces `steps` more fit steps on `batches` and prints device time per kernel class, each device's
    idle share, and each convolution's and fusion's rate for its work (hlo_rates)."""
    import jax

    with jax.profiler.trace(folder, create_perfetto_trace=True):
        model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    paths = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    if paths:
        trace = max(paths, key=os.path.getmtime)
        summarize_trace(trace, steps)
        if glob.glob(os.path.join(folder, "hlo", "*train_step*after_optimizations.txt")):
            for line in hlo_rates.rates(os.path.join(folder, "hlo"), trace, steps):
                print("profile:", line)


def kernel_class(name):
    lowered = name.lower()
    if any(k in lowered for k in ("xmma", "cutlass", "cudnn", "conv", "gemm", "cublas", "sm90_", "sm80_", "implicit")):
        if "wgrad" in lowered or "bwd_filter" in lowered or "backward_filter" in lowered:
            return "conv weight-gradient"
        if "dgrad" in lowered or "bwd_data" in lowered:
            return "conv data-gradient"
        return "conv/matmul (library)"
    if "nccl" in lowered:
        return "NCCL collectives"
    if "memcpy" in lowered or "memset" in lowered:
        return "memcpy/memset"
    if "reduce" in lowered:
        return "XLA reduction fusions"
    if "fusion" in lowered or "loop" in lowered or "transpose" in lowered:
        return "XLA elementwise fusions"
    return "other"


def summarize_trace(path, steps):
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    gpu = [e for e in events if e.get("ph") == "X" and "GPU" in process.get(e.get("pid"), "")]
    names = {thread.get((e["pid"], e["tid"]), "") for e in gpu}
    print("profile: GPU lines", sorted(names))
    # Derived lines (XLA Ops, XLA Modules, Steps) repeat the kernels' time.
    streams = {n for n in names if n.startswith("Stream")} or {n for n in names if "XLA" not in n and "Step" not in n}
    # Only the training step's own kernels where the trace names their program: fit also runs small
    # programs of its own (resetting its metrics as it starts), which are not part of a step.
    if any(e.get("args", {}).get("hlo_module") for e in gpu):
        gpu = [e for e in gpu if e.get("args", {}).get("hlo_module") in ("jit_train_step", "jit_multi_train_steps")]
    per_kernel = {}
    for e in gpu:
        if thread.get((e["pid"], e["tid"]), "") in streams:
            per_kernel[e["name"]] = per_kernel.get(e["name"], 0.0) + float(e.get("dur", 0))
    total = sum(per_kernel.values())
    for pid in sorted({e["pid"] for e in gpu}):
        line = {e["tid"]: thread.get((pid, e["tid"]), "") for e in gpu if e["pid"] == pid}
        computing = {tid for tid, name in line.items() if name in streams and ("Compute" in name or "Memcpy" not in name)}
        kernels = [e for e in gpu if e["pid"] == pid and e["tid"] in computing]  # not the copy-only streams
        print_idle(process[pid], kernels, steps)
        print_tail(kernels, steps)
    if not total:
        print("profile: no GPU kernel events found in", path, "threads:", sorted(set(thread.values()))[:20])
        return
    classes = {}
    for name, us in per_kernel.items():
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + us
    print(f"profile: {total / steps / 1e3:.1f} ms of kernels per step")
    for name, us in sorted(classes.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {us / steps / 1e3:7.2f} ms/step  {100 * us / total:5.1f}%")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]:
        print(f"    {us / steps / 1e3:6.2f} ms  {name[:110]}")


def print_idle(device, kernels, steps):
    """Where a device idles: the gaps between its kernels, summed by the kinds of kernel either side, and
    the longest ones by name (a step boundary shows as a gap before the step's first convolution)."""
    reach, last, gaps, pairs = None, None, [], {}
    for e in sorted(kernels, key=lambda e: float(e["ts"])):
        start, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
        if last is not None and start - reach > 2:  # gaps under 2 us are launch spacing
            gaps.append((start - reach, describe(last), describe(e)))
            key = f"{kernel_class(last['name'])} -> {kernel_class(e['name'])}"
            pairs[key] = pairs.get(key, 0.0) + start - reach
        if reach is None or end >= reach:
            reach, last = end, e
    busy = busy_and_span(kernels)
    if not busy:
        return
    print(f"profile: {device}: kernels busy {busy[0] / steps / 1e3:.1f} ms per step, idle "
          f"{(busy[1] - busy[0]) / steps / 1e3:.1f} ms between them (from the first kernel to the last)")
    for key, us in sorted(pairs.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  idle after {key}: {us / steps / 1e3:.2f} ms/step")
    for us, before, after in sorted(gaps, reverse=True)[:5]:
        print(f"  {us / 1e3:.2f} ms idle between {before} and {after}")


def print_tail(kernels, steps):
    """Kernels per step, and what runs after each step's last convolution or matmul: the optimizer's updates,
    and over several devices whatever waits for the last all-reduce. A step's kernels are the same each
    time, so the trace's kernels are cut into `steps` equal runs."""
    ordered = sorted(kernels, key=lambda e: float(e["ts"]))
    per_step = len(ordered) // steps
    if not per_step:
        return
    count, span, classes = 0, 0.0, {}
    for n in range(steps):
        step = ordered[n * per_step:(n + 1) * per_step]
        library = [i for i, e in enumerate(step) if kernel_class(e["name"]).startswith("conv")]
        if not library:
            return
        tail = step[library[-1] + 1:]
        count += len(tail)
        if tail:
            span += max(float(e["ts"]) + float(e.get("dur", 0)) for e in tail) - (
                float(step[library[-1]]["ts"]) + float(step[library[-1]].get("dur", 0)))
        for e in tail:
            name = e["name"].split(".")[0].rstrip("_0123456789") or e["name"]
            classes[name] = classes.get(name, 0) + 1
    top = ", ".join(f"{n / steps:.0f} {name}" for name, n in sorted(classes.items(), key=lambda kv: -kv[1])[:4])
    print(f"  {per_step} kernels per step; after its last convolution or matmul {count / steps:.0f} kernels "
          f"in {span / steps / 1e3:.2f} ms ({top})")


def describe(event):
    """A trace event's name, with the XLA instruction it runs and the bytes it copies when the trace says."""
    args = event.get("args", {})
    details = [args[k] for k in ("hlo_op", "hlo_module") if args.get(k)]
    details += [d for d in str(args.get("memcpy_details", "")).split() if d.startswith(("num_bytes", "kind_"))]
    return event["name"][:60] + (f" ({', '.join(map(str, details))})" if details else "")


def busy_and_span(events):
    """(time some kernel runs, time from the first kernel's start to the last one's end), microseconds."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events)
    if not spans:
        return None
    busy, start, end = 0.0, *spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy, start = busy + end - start, s
        end = max(end, e)
    return busy + end - start, end - spans[0][0]


def shuffled_batches(images, labels, batch_size, seed=0):
    """Endless batches, reshuffled every pass (a numpy `fit` input stops after one pass)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(labels))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = order[start:start + batch_size]
            yield images[chosen], labels[chosen]


def digits_check(a):
    """Loss curve of the trainer's step on the digits sample, 8x8 scaled up to 32x32.

    The first 1,437 images train and the last 360 are held out. With --save DIR
    the trained weights and the held-out images and probabilities are saved, so
    the CPU can export the weights with TensorFlow and check its predictions.
    """
    data = np.load(a.digits)
    images = (data["images"].astype("float32") * (255 / 16)).astype(np.uint8)  # sklearn digits are 0..16
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=-1)
    labels = data["labels"]
    train, held_out = slice(0, len(labels) - 360), slice(len(labels) - 360, None)
    keras.utils.set_random_seed(0)
    model = build(a.model_type, 32, a.precision, 1, num_classes=10, learning_rate=a.digits_lr, bn_moments=a.bn_moments,
                  max_pool=a.max_pool, stem=a.stem)
    blocks = a.digits_steps // 10
    history = model.fit(shuffled_batches(images[train], np.eye(10, dtype="float32")[labels[train]], 64),
                        epochs=blocks, steps_per_epoch=10, verbose=0)
    losses = [round(v, 3) for v in history.history["loss"]]
    logits = model.predict(images[held_out], batch_size=256, verbose=0).astype("float64")
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    accuracy = float(np.mean(np.argmax(probabilities, -1) == labels[held_out]))
    print(f"digits {a.model_type} {a.precision} {keras.backend.backend()} devices {a.devices} lr {a.digits_lr}: mean loss of each "
          f"10 steps: {losses}; held-out accuracy after {blocks * 10} steps {accuracy:.4f}")
    if a.save:
        os.makedirs(a.save, exist_ok=True)
        weights_only = models.build_model(a.model_type, 10, 32)  # uncompiled: saves no optimizer state
        weights_only.set_weights(model.get_weights())
        weights_only.save_weights(os.path.join(a.save, "digits.weights.h5"))
        np.savez(os.path.join(a.save, "digits_held_out.npz"), images=images[held_out], labels=labels[held_out],
                 probabilities=np.asarray(probabilities, dtype="float32"))
    return {"digits_loss": losses, "digits_accuracy": accuracy}


def record_digits(a, result):
    """The digits loss curve as a table: the mean loss of every third block of 10 steps, and the held-out top-1."""
    import jax

    shown = list(range(0, len(result["digits_loss"]), 3))
    where = f"{jax.devices()[0].platform}-{a.devices}"
    results.record(f"digits-curve-{a.model_type}-{where}",
                   ["devices", "precision", *[f"steps {10 * i + 1}-{10 * i + 10}" for i in shown], "held-out top-1"],
                   [[f"{a.devices} {jax.devices()[0].device_kind}", a.precision,
                     *[result["digits_loss"][i] for i in shown], round(result["digits_accuracy"], 4)]])


def main(argv=None):
    a = parse_args(argv)
    if a.profile:
        dump_compiled_step(a.profile)
    a.devices = 1
    if a.data_parallel:
        from trainer import distribute
        from trainer.cluster import cluster_from_env

        _, a.devices = distribute.setup("jax", cluster_from_env())  # TF_CONFIG: one process of several
        a.batch_size *= a.devices
    result = digits_check(a) if a.digits else measure(a)
    if keras.distribution.distribution() is not None and not is_first_process():
        return result  # the first process reports for all: they step together
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    if a.digits:
        return record_digits(a, result)
    name = f"gpu-throughput-{result['model_type']}-{result['input']}-{result['devices']}gpu"
    results.record(name, ["model", "GPUs", "batch", "precision", "input", "img/s", "step ms", "peak GiB",
                          "train GFLOP/img", "share of ceiling", "inference img/s"], [[
        result["model_type"], result["devices"], result["batch_size"], result["precision"], result["input"],
        round(result["img_per_s"]), round(result["step_ms"], 1), round(result["peak_mem_gib"], 1),
        round(result.get("train_gflop_per_img", 0), 2) or None,
        f"{100 * result['ceiling_share']:.1f}%" if "ceiling_share" in result else None,
        round(result["inference_img_per_s"]) if "inference_img_per_s" in result else None]])


if __name__ == "__main__":
    main()
