"""Offline prediction throughput (images/s) of trainer.predict on this machine's CPU.

Writes --num_images JPEGs of 500x375 (ImageNet's typical size), exports each
--models backbone with random weights at --image_size (what is timed does not
depend on the weights), and records a table of images/s (bench/results/predict.json) for:
  input     the tf.data pipeline alone (read, and the 1/8-scale decode probe
            that drops undecodable images)
  model     serving_default alone (decode, central crop, resize and the
            network), on one batch of encoded images already in memory
  predict   the whole job: trainer.serving.predict's predict_into() writing the
            output file (model load and export excluded; the first batch included)

    KERAS_BACKEND=tensorflow python bench/predict_bench.py --models resnet-18,efficientnet-b0
"""

import argparse
import io
import os
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import results


def write_jpegs(folder, count, seed=0):
    """Smooth colour gradients with noise: decodes like a photo, unlike pure noise."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500]
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0.005, 0.03, size=3)
        base = np.stack([np.sin(a * x + i), np.cos(b * y), np.sin(c * (x + y))], axis=-1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        path = os.path.join(folder, f"{i:05d}.jpg")
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
        paths.append(path)
    return paths


def export(model_type, image_size, folder):
    """Exports the backbone afresh each time: a kept export may be an older code's."""
    from trainer import export as export_lib
    from trainer import models

    model_dir = os.path.join(folder, f"{model_type}-{image_size}")
    weights = f"{model_dir}.weights.h5"
    models.build_model(model_type, 1000, image_size).save_weights(weights)
    export_lib.export_saved_model(weights, model_type, "classification", 1000, image_size,
                                  [f"n{i:05d}" for i in range(1000)], model_dir)
    return model_dir


def rate(count, fn):
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def measure(model_dir, paths, batch_size, folder):
    import tensorflow as tf

    from trainer.serving import inference, predict

    model = inference.load(model_dir)
    batches = predict.encoded_batches(paths, batch_size, 16, predict._fetcher(30.0, {}))
    input_rate = rate(len(paths), lambda: [None for _ in batches])
    batch = next(iter(batches))[1]
    model.serve_bytes(image_bytes=batch)  # first call: graph warm-up, not timed
    model_rate = rate(3 * len(batch), lambda: [model.serve_bytes(image_bytes=batch)["probabilities"].numpy()
                                               for _ in range(3)])
    out_path = os.path.join(folder, "predictions.txt")
    with tf.io.gfile.GFile(out_path, "w") as out:
        predict_rate = rate(len(paths), lambda: predict.predict_into(out, model, paths, paths, "text", batch_size, 16, 30.0))
    return input_rate, model_rate, predict_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet-18,efficientnet-b0")
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--work_dir", default="/tmp/predict_bench")
    args = parser.parse_args()
    from trainer import cli

    cli.import_tensorflow_quietly()
    paths = write_jpegs(os.path.join(args.work_dir, "images"), args.num_images)
    rows = []
    for model_type in args.models.split(","):
        model_dir = export(model_type, args.image_size, args.work_dir)
        input_rate, model_rate, predict_rate = measure(model_dir, paths, args.batch_size, args.work_dir)
        rows.append((model_type, round(input_rate), round(model_rate, 1), round(predict_rate, 1)))
        print(rows[-1], flush=True)
    results.record("predict", ("model", "input img/s", "model img/s", "predict img/s"), rows)

if __name__ == "__main__":
    main()
