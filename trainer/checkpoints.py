"""checkpoints/: what a resumed run needs, committed atomically by state.json.

    ckpt-STEP.weights.h5      weights and optimizer state (slots, iterations) after STEP batches
    best-STEP.weights.h5      weights of the best evaluation so far
    state.json                the commit: step, file names, evaluations, best,
                              and the settings a resume must share

The input pipeline is a pure function of (seed, step), so the step is also
the data position. Files are written first and state.json last; a crash at
any point leaves the previous state.json and every file it names intact.
"""

import io
import json
import os

import numpy as np

from trainer import report
from trainer.config import UserError

# Settings that must not change across a resume: the weights, the optimizer
# slots or the data position would not mean the same thing.
RUN_FIELDS = ("model_type", "num_classes", "image_size", "task", "optimizer_type", "optimizer_arguments",
              "train_batch_size", "seed", "training_data_path")


def run_fingerprint(config):
    return {name: _jsonable(getattr(config, name)) for name in RUN_FIELDS}


def _jsonable(value):
    return [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value


class Checkpoints:
    def __init__(self, folder):
        self.folder = folder
        self.state_path = os.path.join(folder, "state.json")

    def load_state(self, fingerprint):
        """The committed state ({} when none), refused if it belongs to a different run."""
        gfile = report.gfile()
        if not gfile.exists(self.state_path):
            return {}
        with gfile.GFile(self.state_path) as f:
            state = json.load(f)
        for name, value in state.get("run", {}).items():
            if fingerprint.get(name) != value:
                raise UserError(
                    f"--job-dir holds a checkpoint of a different run (--{name} was {value!r}, now {fingerprint.get(name)!r}); "
                    f"use a new --job-dir, or remove {self.folder} to start over"
                )
        return state

    def restore(self, model, state):
        """Loads the weights and optimizer state that `state` names."""
        optimizer = model.optimizer
        optimizer.build(model.trainable_variables)  # built, so load_weights fills its slots too
        model.load_weights(os.path.join(self.folder, state["weights"]))
        if "optimizer" not in state:
            return
        # Checkpoints of version 0.1.0 before this change kept the optimizer state apart.
        with report.gfile().GFile(os.path.join(self.folder, state["optimizer"]), "rb") as f:
            saved = np.load(io.BytesIO(f.read()))
            values = [saved[f"v{i}"] for i in range(len(saved.files))]
        if len(values) != len(optimizer.variables):
            raise UserError(f"{self.folder}: the optimizer state does not fit this optimizer; use a new --job-dir")
        for variable, value in zip(optimizer.variables, values):
            variable.assign(value)

    def save_best(self, model, step):
        """Writes best-STEP.weights.h5; it counts once save() commits it."""
        name = f"best-{step}.weights.h5"
        model.save_weights(os.path.join(self.folder, name))
        return name

    def save(self, model, step, state):
        """Writes ckpt-STEP files, commits them with `state`, then removes what no commit names."""
        gfile = report.gfile()
        weights = f"ckpt-{step}.weights.h5"
        model.save_weights(os.path.join(self.folder, weights))  # the optimizer state too: the model is compiled
        state = {key: value for key, value in state.items() if key != "optimizer"}
        report.write_json(self.state_path, {**state, "step": step, "weights": weights})
        keep = {weights, state.get("best_weights")}
        for name in gfile.listdir(self.folder):
            if name.startswith(("ckpt-", "best-")) and name not in keep:
                try:
                    gfile.remove(os.path.join(self.folder, name))
                except Exception:  # noqa: BLE001 - already gone is fine
                    pass
