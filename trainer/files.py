"""File plumbing: local and gs:// paths alike, and writes a crash never leaves half done.

Every output a program commits (metrics.json, config.json, state.json, the
SavedModel folder, trials.csv, merged predictions) is written to a temporary
name beside its target and renamed into place, so a reader, or a process
killed mid-write, sees the old version or the new one. Local paths use the
standard library (the study driver runs without TensorFlow); paths with a
scheme (gs://) go through tf.io.gfile. A local file is flushed to the disk
(fsync) before its rename, so a crash of the machine cannot leave an empty
file under the committed name. A full disk (or quota, or file-size limit)
while writing is a UserError naming the file: the earlier version stays.
A folder's temporary copies that a killed process left are removed by the
next write of that folder.
"""

import contextlib
import errno
import json
import os
import shutil

from trainer.cli import UserError

# errno values that mean "no room": a full disk, a quota, a file-size limit (ulimit -f).
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# How h5py and TensorFlow, which wrap the system's error in their own text, say the same.
_NO_ROOM_TEXT = ("No space left on device", "Disk quota exceeded", "File too large", "errno = 28", "errno = 27",
                 "errno = 122")


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


def tree_bytes(path):
    """Bytes in the files under a local or remote folder."""
    if is_remote(path):
        return sum(gfile().stat(gfile().join(folder, name)).length
                   for folder, _, names in gfile().walk(path) for name in names)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


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


def is_out_of_room(error):
    """Whether an exception says the disk, a quota or a file-size limit is full."""
    if isinstance(error, OSError) and error.errno in _NO_ROOM:
        return True
    return any(text in str(error) for text in _NO_ROOM_TEXT)


class OutOfRoom(UserError):
    """A write that found the disk, a quota or a file-size limit full: names the file and what is intact."""

    def __init__(self, path, reason, intact="what was written before it is intact, a run's last committed "
                                            "checkpoint included: free some space and rerun the same command"):
        super().__init__(f"cannot write {path}: {reason} (the disk, a quota or a file-size limit is full); {intact}")
        self.path, self.reason = path, reason


def out_of_room(path, error, intact=None):
    """The OutOfRoom for a write to path that failed with error (an OSError, or a library's error saying so)."""
    reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno in _NO_ROOM else "no space left"
    return OutOfRoom(path, reason) if intact is None else OutOfRoom(path, reason, intact)


def sync(path):
    """Flushes a local file, or every file of a local folder, and the folder entries, to the disk."""
    if is_remote(path):
        return
    if os.path.isdir(path):
        for folder, _, names in os.walk(path):
            for name in names:
                sync(os.path.join(folder, name))
            _fsync(folder)
    else:
        _fsync(path)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_parent(path):
    """Makes a rename into path's folder durable (a no-op where folders cannot be opened)."""
    if not is_remote(path):
        with contextlib.suppress(OSError):
            _fsync(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_writer(path, mode="w"):
    """Yields a file open at a temporary name; renamed to path only when the block ends without error.

    A full disk raises out_of_room() naming path; the earlier version of path stays.
    """
    tmp = _temporary(path)
    opener = gfile().GFile if is_remote(path) else open
    kwargs = {} if is_remote(path) or "b" in mode else {"newline": ""}
    try:
        with opener(tmp, mode, **kwargs) as f:
            yield f
            if not is_remote(path):
                f.flush()
                os.fsync(f.fileno())  # the data reaches the disk before the name does
        _rename(tmp, path)
        _sync_parent(path)
    except BaseException as e:
        remove(tmp)
        if isinstance(e, Exception) and is_out_of_room(e):
            raise out_of_room(path, e) from None
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
    Temporary folders of target that a killed process left (target.tmp-PID,
    target.old-PID) are removed first. A full disk raises out_of_room().
    """
    remove_litter(target)
    tmp = _temporary(target)
    _remove_tree(tmp)
    try:
        write(tmp)
        sync(tmp)
    except Exception as e:
        _remove_tree(tmp)
        if is_out_of_room(e):
            raise out_of_room(target, e) from None
        raise
    old = f"{target.rstrip('/')}.old-{os.getpid()}"
    if exists(target):
        gfile().rename(target, old) if is_remote(target) else os.rename(target, old)
    gfile().rename(tmp, target) if is_remote(target) else os.rename(tmp, target)
    _sync_parent(target)
    _remove_tree(old)


def remove_litter(target):
    """Removes target.tmp-PID and target.old-PID folders or files of processes that are gone.

    A local one of another process that still runs on this machine is left
    alone (it may be writing); on gs:// every one goes, since one process
    writes a job-dir (trainer/lock.py). This process's own are always litter:
    as a container's PID 1, a killed run had the same PID.
    """
    folder, base = os.path.split(str(target).rstrip("/"))
    folder = folder or "."
    try:
        names = [name.rstrip("/") for name in listdir(folder)]
    except Exception:  # noqa: BLE001 - no folder yet: nothing left behind
        return
    for name in names:
        pid = _litter_pid(name, base)
        if pid is None or (pid != os.getpid() and not is_remote(folder) and _running(pid)):
            continue
        path = os.path.join(folder, name)
        if is_remote(path):
            _remove_tree(path) if gfile().isdir(path) else remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            remove(path)


def _litter_pid(name, base):
    for marker in (".tmp-", ".old-"):
        if name.startswith(base + marker) and name[len(base + marker):].isdigit():
            return int(name[len(base + marker):])
    return None


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_tree(path):
    if not exists(path):
        return
    if is_remote(path):
        gfile().rmtree(path)
    else:
        shutil.rmtree(path)
