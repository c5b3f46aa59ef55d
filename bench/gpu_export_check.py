"""Does a model trained on the GPU (JAX) export and predict the same on CPU TensorFlow? (issue 5)

Takes what `bench/gpu_throughput.py --digits FILE --save DIR` wrote on the GPU
machine (the trained weights and the held-out images with the GPU's
probabilities), exports the weights with the trainer's own exporter on the
TensorFlow backend, loads the SavedModel with tf.saved_model.load and compares
its serving_images probabilities with the GPU's:

    KERAS_BACKEND=tensorflow python bench/gpu_export_check.py --saved DIR --model_type resnet-18
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import results  # found through the path above


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saved", required=True, help="folder with digits.weights.h5 and digits_held_out.npz")
    p.add_argument("--model_type", default="resnet-18")
    a = p.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from trainer.export import export_saved_model
    from trainer.cli import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    held_out = np.load(os.path.join(a.saved, "digits_held_out.npz"))
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = os.path.join(tmp, "model")
        export_saved_model(os.path.join(a.saved, "digits.weights.h5"), a.model_type, "classification", 10, 32,
                           [str(i) for i in range(10)], export_dir)
        served = tf.saved_model.load(export_dir).signatures["serving_images"]
        cpu = served(images=tf.constant(held_out["images"]))["probabilities"].numpy()
    gpu = held_out["probabilities"]
    labels = held_out["labels"]
    agree = np.mean(np.argmax(cpu, -1) == np.argmax(gpu, -1))
    results.record(f"gpu-export-check-{a.model_type}", [
        "held-out images", "GPU top-1 (JAX, bf16)", "exported SavedModel on CPU TF (float32) top-1", "same top-1 class",
        "max abs probability difference", "mean"], [[
            len(labels), round(float(np.mean(np.argmax(gpu, -1) == labels)), 4),
            round(float(np.mean(np.argmax(cpu, -1) == labels)), 4), round(float(agree), 4),
            round(float(np.max(np.abs(cpu - gpu))), 4), round(float(np.mean(np.abs(cpu - gpu))), 5)]])


if __name__ == "__main__":
    main()
