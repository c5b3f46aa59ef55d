"""Keras Image Trainer: train, evaluate and export image classifiers."""

from setuptools import find_packages, setup

setup(
    name="keras-image-trainer",
    version="0.1.0",
    description=(
        "Built-in-algorithm style image classification trainer on Keras 3: "
        "flat flags in, best-checkpoint SavedModel out."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*", "hptuning", "hptuning.*"]),
    install_requires=[
        # TensorFlow reads the input (tf.data) and writes the SavedModel
        # whatever backend trains. The container's TF GPU base image already
        # satisfies this requirement.
        "tensorflow>=2.18",
        "tensorboard>=2.18",
        "keras==3.15.1",
        "keras-hub==0.32.0",
        "absl-py>=2.1",
        "numpy",
        "pyyaml>=6",
        "optuna>=4.2",
        "plotly>=5",  # the study driver's HTML plots
        "pillow>=10",  # predict and serve read an image's size from its header before decoding it
        "matplotlib>=3.8",  # the run report's plots (report/ in the job-dir); tested with 3.11.2
        "psycopg2-binary>=2.9",  # distributed studies on PostgreSQL
        "scikit-learn>=1.4",  # ships the bundled digits sample
        # tfds:NAME/SPLIT data paths: prepared TFDS datasets, read offline (importlib_resources: its builders need it)
        "tensorflow-datasets==4.9.10", "importlib_resources>=6",
    ],
    extras_require={
        "jax": ["jax[cpu]>=0.6"],
        "test": [
            "pytest>=8", "pytest-xdist>=3", "pillow>=10", "jax[cpu]>=0.6", "ruff==0.17.6",
            # The real clients whose output the study driver must take: Vertex AI's SDK
            # (study specs built with its own types) and Google's hypertune reporter.
            "google-cloud-aiplatform==2.7.0", "cloudml-hypertune==0.1.0.dev6",
        ],
    },
)
