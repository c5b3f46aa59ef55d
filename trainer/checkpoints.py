"""checkpoints/: what a resumed run needs, committed atomically by state.json.

    ckpt-STEP.weights.h5      weights and optimizer state (slots, iterations, the weights' average)
                              after STEP batches; the --max_to_keep newest
    best-STEP.weights.h5      weights of the best evaluation so far (averaged, with --ema_decay;
                              else ckpt-STEP's file under a second name, a hard link where local)
    state.json                the commit: step, file names, evaluations, best,
                              and the run fingerprint a resume must match

The input pipeline is a pure function of (seed, step), so the step is also
the data position. Files are written first and state.json last; a crash at
any point leaves the previous state.json and every file it names intact.
Each weights file is written under a temporary name, flushed to the disk and
renamed, and each ckpt-STEP file also carries its own commit (the dataset
`trainer_state`: the state.json written with it). So a damaged or empty
state.json, or a damaged weights file it names, falls back to the newest
intact checkpoint, with a note saying so (only the committed best-STEP file
is kept, so a fallback whose best weights are gone chooses the best again
from the evaluations after it); a full disk is one error naming the file,
with the last commit untouched.
One Checkpoints object per run owns the fingerprint: the values of the flags
the table (schema.py) marks as fingerprint.
"""

import io
import json
import os
import shutil
import tempfile

import numpy as np

from trainer import cli, files, schema
from trainer.cli import UserError

STATE = "state.json"
EMBEDDED = "trainer_state"  # the dataset of a ckpt-STEP file holding its commit, as JSON bytes


def _jsonable(value):
    return [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value


class Checkpoints:
    def __init__(self, read_folder, write_folder, config):
        """read_folder: the chief's checkpoints (resumed from); write_folder: where this process saves."""
        self.read_folder, self.folder = read_folder, write_folder
        self.fingerprint = {name: _jsonable(getattr(config, name)) for name in schema.fingerprint_fields()}
        self.max_to_keep = config.max_to_keep
        self.committed_step = None  # the step of the last commit read or written, for error messages
        self._best_unwritten = None  # (step, best-STEP's name) when save() of that step writes its weights

    def load_state(self):
        """The committed state ({} when none), refused if it belongs to a different run.

        A damaged state.json, or one whose weights file is damaged or missing, gives
        the newest intact checkpoint's own commit instead; a commit whose best weights
        are gone keeps its evaluations and chooses the best again. A note says so.
        """
        path = os.path.join(self.read_folder, STATE)
        if not files.exists(path):
            return {}
        try:
            state = files.read_json(path)
            problem = self._damage(state)
        except (ValueError, UnicodeDecodeError) as e:
            problem = f"{path} is damaged ({_first_line(e)})"
        state = self._fallback(problem) if problem else state
        for name, value in state.get("run", {}).items():
            if self.fingerprint.get(name) != value:
                raise UserError(
                    f"--job-dir holds a checkpoint of a different run (--{name} was {value!r}, now "
                    f"{self.fingerprint.get(name)!r}); use a new --job-dir, or remove {self.read_folder} to start over"
                )
        best_problem = state.get("best_weights") and _unreadable(os.path.join(self.read_folder, state["best_weights"]))
        if best_problem:
            cli.say(f"note: {best_problem}: the best evaluation is chosen again from those after step {state['step']}")
            state = {**state, "best": None, "best_weights": None}
        self.committed_step = state["step"]
        return state

    def _damage(self, state):
        """Why a commit cannot be resumed (not a commit; its weights file missing or unreadable), or None."""
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("weights"), str)):
            return f"{os.path.join(self.read_folder, STATE)} is damaged (not a commit of this trainer)"
        return _unreadable(os.path.join(self.read_folder, state["weights"]))

    def _fallback(self, problem):
        """The commit the newest intact step checkpoint carries; UserError when there is none."""
        names = files.listdir(self.read_folder)
        for step in sorted((int(name[5:-11]) for name in names if _is_step_checkpoint(name)), reverse=True):
            name = f"ckpt-{step}.weights.h5"
            state = _embedded_commit(os.path.join(self.read_folder, name))
            if state is not None and state.get("weights") == name and not self._damage(state):
                cli.say(f"note: {problem}; resuming instead from the newest intact checkpoint, step {step} ({name})")
                return state
        raise UserError(f"{problem}, and no other checkpoint in {self.read_folder} can be resumed: remove "
                        f"{self.read_folder} to start over, or use a new --job-dir")

    def restore(self, model, state):
        """Loads the weights and optimizer state that `state` names."""
        optimizer = model.optimizer
        optimizer.build(model.trainable_variables)  # built, so load_weights fills its slots too
        path = os.path.join(self.read_folder, state["weights"])
        try:
            model.load_weights(path)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path} cannot be loaded into this model ({_first_line(e)}); remove {self.read_folder} "
                            "to start over, or use a new --job-dir") from None
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
        """Names best-STEP.weights.h5, the model's weights now; it counts once save() commits it.

        Averaged weights (--ema_decay) are written now. Other weights are the ones
        save() writes next, for the same step: it writes them once, under both names.
        """
        from trainer import models  # Keras: loaded by now, as the model is

        name = f"best-{step}.weights.h5"
        if getattr(models.inner_optimizer(model.optimizer), "use_ema", False):
            self._save_weights(model, name)
        else:
            self._best_unwritten = (step, name)
        return name

    def save(self, model, step, state):
        """Writes ckpt-STEP files, commits them with `state` and the fingerprint, then removes the step
        checkpoints beyond the max_to_keep newest and every best-* file but the committed one."""
        weights = f"ckpt-{step}.weights.h5"
        commit = {**state, "run": self.fingerprint, "step": step, "weights": weights}
        self._save_weights(model, weights, commit)  # the optimizer state too: the model is compiled
        if self._best_unwritten == (step, state.get("best_weights")):
            self._second_name(weights, state["best_weights"])
        self._best_unwritten = None
        try:
            files.write_json(os.path.join(self.folder, STATE), commit)
        except files.OutOfRoom as e:  # say which commit stands
            raise files.OutOfRoom(e.path, e.reason, self._intact()) from None
        self.committed_step = step
        names = files.listdir(self.folder)
        steps = sorted((int(name[5:-11]) for name in names if _is_step_checkpoint(name)), reverse=True)
        keep = {f"ckpt-{s}.weights.h5" for s in steps[:self.max_to_keep]} | {weights, state.get("best_weights")}
        for name in names:
            if name.startswith(("ckpt-", "best-")) and name not in keep:
                files.remove(os.path.join(self.folder, name))

    def _intact(self):
        """What a full disk leaves intact, and what to do."""
        if self.committed_step is None:
            return "nothing was committed yet: free some space and rerun the same command"
        return (f"the checkpoint at step {self.committed_step} in {self.folder} is intact: free some space and rerun "
                "the same command to resume from it")

    def _save_weights(self, model, name, commit=None):
        """model.save_weights to name in the folder: written under a temporary name (a local one for gs://),
        with `commit` inside, flushed to the disk and moved into place. A full disk is a UserError."""
        target = os.path.join(self.folder, name)
        remote = files.is_remote(target)
        tmp_dir = tempfile.mkdtemp(prefix="weights-") if remote else None
        tmp = os.path.join(tmp_dir, name) if remote else f"{target[:-len('.weights.h5')]}.tmp-{os.getpid()}.weights.h5"
        try:
            model.save_weights(tmp)
            if commit is not None:
                import h5py

                with h5py.File(tmp, "a") as h5:
                    text = json.dumps(commit, sort_keys=True, allow_nan=False).encode("utf-8")
                    h5.create_dataset(EMBEDDED, data=np.frombuffer(text, np.uint8))
            files.sync(tmp)
            if remote:
                files.gfile().copy(tmp, target, overwrite=True)
            else:
                os.replace(tmp, target)
        except Exception as e:
            _abandon_h5(tmp)
            if files.is_out_of_room(e):
                raise files.out_of_room(target, e, self._intact()) from None
            raise
        finally:
            if tmp_dir:
                shutil.rmtree(tmp_dir, ignore_errors=True)

    def _second_name(self, name, other):
        """Gives the weights file `name`, just written, the second name `other`: a hard link (a copy on
        gs:// or where links fail), put in place whole. A full disk is a UserError."""
        source, target = os.path.join(self.folder, name), os.path.join(self.folder, other)
        tmp = f"{target[:-len('.weights.h5')]}.tmp-{os.getpid()}.weights.h5"
        try:
            if files.is_remote(target):
                files.gfile().copy(source, target, overwrite=True)
                return
            try:
                os.link(source, tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(source, tmp)
                files.sync(tmp)
            os.replace(tmp, target)
        except Exception as e:
            files.remove(tmp)
            if files.is_out_of_room(e):
                raise files.out_of_room(target, e, self._intact()) from None
            raise


def _abandon_h5(path):
    """Removes a weights file whose write failed. HDF5 still holds it open, with data it could not write: the
    file is emptied first (freeing the room its flush needs), then closed, else the interpreter's teardown
    retries the write and crashes (a segfault on a full disk)."""
    import h5py

    try:
        os.truncate(path, 0)
    except OSError:
        pass
    for file_id in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        try:
            if os.path.abspath(os.fsdecode(file_id.name)) == os.path.abspath(path):
                h5py.File(file_id).close()
        except Exception:  # noqa: BLE001 - closing is best effort: the file is removed either way
            pass
    files.remove(path)


def _is_step_checkpoint(name):
    return name.startswith("ckpt-") and name.endswith(".weights.h5") and name[5:-11].isdigit()


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _open_h5(path):
    """An h5py.File of a local or gs:// weights file (gs:// read through tf.io.gfile, lazily)."""
    import h5py

    return h5py.File(files.open_file(path, "rb") if files.is_remote(path) else path, "r")


def _unreadable(path):
    """Why a weights file cannot be resumed from (missing, truncated, not HDF5), or None.

    Opening checks the file's recorded length; visiting opens every group's and dataset's header
    (no weights are read).
    """
    if not files.exists(path):
        return f"{path} is missing"
    try:
        with _open_h5(path) as h5:
            h5.visititems(lambda name, item: None)
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, KeyError, RuntimeError... for a damaged file
        return f"{path} is damaged ({_first_line(e)})"
    return None


def _embedded_commit(path):
    """The commit a ckpt-STEP file carries, or None (an older trainer's file, or unreadable)."""
    try:
        with _open_h5(path) as h5:
            if EMBEDDED not in h5:
                return None
            state = json.loads(bytes(h5[EMBEDDED][()]).decode("utf-8"))
    except Exception:  # noqa: BLE001 - damaged: not a checkpoint to fall back to
        return None
    return state if isinstance(state, dict) else None
