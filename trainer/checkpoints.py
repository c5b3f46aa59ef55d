"""checkpoints/: what a resumed run needs, committed atomically by state.json.

    ckpt-STEP.weights.h5      weights and optimizer state (slots, iterations, the weights' average)
                              after STEP batches; the --max_to_keep newest
    best-STEP.weights.h5      weights of the best evaluation so far (averaged, with --ema_decay)
    state.json                the commit: step, file names, evaluations, best,
                              and the run fingerprint a resume must match

The input pipeline is a pure function of (seed, step), so the step is also
the data position. Files are written first and state.json last; a crash at
any point leaves the previous state.json and every file it names intact.
One Checkpoints object per run owns the fingerprint: the values of the flags
the table (schema.py) marks as fingerprint.
"""

import io
import os

import numpy as np

from trainer import files, schema
from trainer.cli import UserError


def _jsonable(value):
    return [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value


class Checkpoints:
    def __init__(self, read_folder, write_folder, config):
        """read_folder: the chief's checkpoints (resumed from); write_folder: where this process saves."""
        self.read_folder, self.folder = read_folder, write_folder
        self.fingerprint = {name: _jsonable(getattr(config, name)) for name in schema.fingerprint_fields()}
        self.max_to_keep = config.max_to_keep

    def load_state(self):
        """The committed state ({} when none), refused if it belongs to a different run."""
        path = os.path.join(self.read_folder, "state.json")
        if not files.exists(path):
            return {}
        state = files.read_json(path)
        for name, value in state.get("run", {}).items():
            if self.fingerprint.get(name) != value:
                raise UserError(
                    f"--job-dir holds a checkpoint of a different run (--{name} was {value!r}, now "
                    f"{self.fingerprint.get(name)!r}); use a new --job-dir, or remove {self.read_folder} to start over"
                )
        return state

    def restore(self, model, state):
        """Loads the weights and optimizer state that `state` names."""
        optimizer = model.optimizer
        optimizer.build(model.trainable_variables)  # built, so load_weights fills its slots too
        model.load_weights(os.path.join(self.read_folder, state["weights"]))
        if "optimizer" not in state:
            return
        # Checkpoints of version 0.1.0 before the optimizer state moved into the weights file kept it apart.
        with files.open_file(os.path.join(self.read_folder, state["optimizer"]), "rb") as f:
            saved = np.load(io.BytesIO(f.read()))
            values = [saved[f"v{i}"] for i in range(len(saved.files))]
        if len(values) != len(optimizer.variables):
            raise UserError(f"{self.read_folder}: the optimizer state does not fit this optimizer; use a new --job-dir")
        for variable, value in zip(optimizer.variables, values):
            variable.assign(value)

    def best_path(self, name):
        return os.path.join(self.folder, name)

    def save_best(self, model, step):
        """Writes best-STEP.weights.h5; it counts once save() commits it."""
        name = f"best-{step}.weights.h5"
        model.save_weights(self.best_path(name))
        return name

    def save(self, model, step, state):
        """Writes ckpt-STEP files, commits them with `state` and the fingerprint, then removes the step
        checkpoints beyond the max_to_keep newest and every best-* file but the committed one."""
        weights = f"ckpt-{step}.weights.h5"
        model.save_weights(os.path.join(self.folder, weights))  # the optimizer state too: the model is compiled
        files.write_json(os.path.join(self.folder, "state.json"),
                         {**state, "run": self.fingerprint, "step": step, "weights": weights})
        names = files.listdir(self.folder)
        steps = sorted((int(name[5:-11]) for name in names if _is_step_checkpoint(name)), reverse=True)
        keep = {f"ckpt-{s}.weights.h5" for s in steps[:self.max_to_keep]} | {weights, state.get("best_weights")}
        for name in names:
            if name.startswith(("ckpt-", "best-")) and name not in keep:
                files.remove(os.path.join(self.folder, name))


def _is_step_checkpoint(name):
    return name.startswith("ckpt-") and name.endswith(".weights.h5") and name[5:-11].isdigit()
