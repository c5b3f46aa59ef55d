"""File plumbing: local and gs:// paths alike, and writes a crash never leaves half done.

Every output a program commits (metrics.json, config.json, state.json, the
SavedModel folder, trials.csv, merged predictions) is written to a temporary
name beside its target and renamed into place, so a reader, or a process
killed mid-write, sees the old version or the new one. Local paths use the
standard library (the study driver runs without TensorFlow); paths with a
scheme (gs://) go through tf.io.gfile.
"""

import contextlib
import json
import os
import shutil


def gfile():
    import tensorflow as tf  # only for gs:// paths; absent on the GPU bench machine

    return tf.io.gfile


def is_remote(path):
    return "://" in str(path)


def exists(path):
    return gfile().exists(path) if is_remote(path) else os.path.exists(path)


def makedirs(path):
    if is_remote(path):
        gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(path, mode="r"):
    """A file object for a local path (the standard library) or a remote one (tf.io.gfile)."""
    return gfile().GFile(path, mode) if is_remote(path) else open(path, mode)


def listdir(path):
    return gfile().listdir(path) if is_remote(path) else os.listdir(path)


def remove(path):
    """Removes a file; already gone is fine."""
    try:
        gfile().remove(path) if is_remote(path) else os.remove(path)
    except Exception:  # noqa: BLE001 - NotFoundError or FileNotFoundError: the goal is met
        pass


def _temporary(path):
    return f"{str(path).rstrip('/')}.tmp-{os.getpid()}"


def _rename(source, target):
    if is_remote(target):
        gfile().rename(source, target, overwrite=True)
    else:
        os.replace(source, target)


@contextlib.contextmanager
def atomic_writer(path, mode="w"):
    """Yields a file open at a temporary name; renamed to path only when the block ends without error."""
    tmp = _temporary(path)
    opener = gfile().GFile if is_remote(path) else open
    kwargs = {} if is_remote(path) or "b" in mode else {"newline": ""}
    try:
        with opener(tmp, mode, **kwargs) as f:
            yield f
        _rename(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def write_atomic(path, text):
    with atomic_writer(path, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)


def write_json(path, value):
    # allow_nan=False: strict JSON, which every parser reads (a NaN must be stopped before it gets here)
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path):
    with open_file(path) as f:
        return json.load(f)


def write_folder_atomic(target, write):
    """Calls write(tmp) to fill a temporary folder, then puts it at target.

    An older target is removed only once the new one is in place (a rename of
    a folder cannot replace another, so the old one is renamed aside first).
    """
    tmp = _temporary(target)
    _remove_tree(tmp)
    write(tmp)
    old = f"{target.rstrip('/')}.old-{os.getpid()}"
    if exists(target):
        gfile().rename(target, old) if is_remote(target) else os.rename(target, old)
    gfile().rename(tmp, target) if is_remote(target) else os.rename(tmp, target)
    _remove_tree(old)


def _remove_tree(path):
    if not exists(path):
        return
    if is_remote(path):
        gfile().rmtree(path)
    else:
        shutil.rmtree(path)
