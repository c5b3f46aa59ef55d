"""One trainer per job-dir: a lease file that names its holder and that a heartbeat keeps fresh.

JOB_DIR/lease.json holds the holder's host, PID and start time, and a
heartbeat (seconds since the epoch) that a daemon thread rewrites every
HEARTBEAT_S seconds. Only the chief of a cluster takes it: the other
processes of one run share the job-dir by design (rundir.py).

Taking the lease:
  * none there: it is created, atomically where the storage allows (a local
    file by a hard link, which fails when the name exists; on gs:// by a
    write, then a read-back that shows whose write won);
  * its holder runs on this machine (same boot and PID namespace): it is held
    while that process lives (PID and process start time match), and taken
    over at once after a crash or a kill;
  * its holder runs elsewhere: it is held while the heartbeat moves; one that
    has not moved for STALE_S seconds is taken over. A lease that looks fresh
    is watched until it moves (held) or goes stale (taken over).
A refusal is a UserError naming the holder; a takeover says so in one line.
Local disks and gs:// work alike: nothing here needs a lock service.
"""

import json
import os
import socket
import threading
import time
import uuid

from trainer import cli, files
from trainer.cli import UserError

NAME = "lease.json"
HEARTBEAT_S = 15.0  # seconds between heartbeats
STALE_S = 60.0  # a heartbeat this many seconds old (four missed beats) means the holder is gone
CONFIRM_S = 2.0  # on gs://, seconds between writing a lease and reading back whose write won


def _machine():
    """This machine and PID namespace, where PIDs can be checked directly; None where /proc cannot say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_start(pid):
    """A process's start time (clock ticks after boot), which a reused PID does not repeat; None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22; the fields after the name start at 3
    except (OSError, ValueError, IndexError):
        return None


def describe(lease):
    """'pid 123 on host-a (since 2026-01-02 03:04:05 UTC)', the holder as a person would look for it."""
    return f"pid {lease.get('pid')} on {lease.get('host')} (since {lease.get('started')})"


class Lease:
    """The lease at path; acquire() or UserError, release() at the end. remote: gs:// behaviour (tests)."""

    def __init__(self, path, heartbeat_s=HEARTBEAT_S, stale_s=STALE_S, confirm_s=CONFIRM_S, remote=None):
        self.path, self.heartbeat_s, self.stale_s, self.confirm_s = path, heartbeat_s, stale_s, confirm_s
        self.remote = files.is_remote(path) if remote is None else remote
        self.token = uuid.uuid4().hex
        self._stop, self._thread = threading.Event(), None

    def acquire(self, what):
        """Takes the lease, or raises UserError naming its live holder; what: how the user named the folder."""
        watched = None  # (text, monotonic time) of a lease whose holder cannot be checked directly
        while True:
            text = self._read()
            if text is None:
                if self._create():
                    break
                continue
            lease = _parse(text)
            verdict = self._judge(lease)
            if verdict == "unknown":  # from another machine with a fresh heartbeat, or damaged: does it move?
                if watched is None or (lease is None and watched[0] != text):
                    if watched is None:
                        holder = f"a lease of {describe(lease)}" if lease else "a damaged lease"
                        cli.say(f"{what} has {holder}, from another machine: waiting up to {self.stale_s:.0f} s "
                                "for its heartbeat")
                    watched = (text, time.monotonic())
                elif watched[0] != text:
                    verdict = "live"
                elif time.monotonic() - watched[1] >= self.stale_s:
                    verdict = f"has not renewed it for {self.stale_s:.0f} s"
            if verdict == "live":
                age = time.time() - lease["heartbeat"]
                raise UserError(f"{what} is in use by another trainer, {describe(lease)}, heartbeat {age:.0f} s ago: "
                                f"wait for it to end or stop it, or give another job-dir (a lease without a "
                                f"heartbeat for {self.stale_s:.0f} s is taken over)")
            if verdict == "unknown":
                self._stop.wait(min(1.0, self.heartbeat_s))
                continue
            if self._replace(text):
                holder = f"the trainer {describe(lease)}, which" if lease else "a damaged lease that"
                cli.say(f"taking over {what} from {holder} {verdict}")
                break
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-heartbeat")
        self._thread.start()

    def release(self):
        """Stops the heartbeat and removes the lease, if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            lease = _parse(self._read() or "")
        except Exception:  # noqa: BLE001 - unreadable now: it goes stale on its own
            return
        if lease and lease.get("token") == self.token:
            files.remove(self.path)

    def _judge(self, lease):
        """'live', 'unknown' (watch it), or why the lease is stale."""
        if lease is None:
            return "unknown"  # damaged or half written: watched like a lease from elsewhere
        if lease.get("machine") and lease.get("machine") == _machine():  # a live process holds it, beat or not
            alive = lease.get("process_start") is not None and _process_start(lease.get("pid")) == lease["process_start"]
            return "live" if alive else "is no longer running"
        age = time.time() - lease["heartbeat"]
        return f"has not renewed it for {age:.0f} s" if age > self.stale_s else "unknown"

    def _content(self):
        pid = os.getpid()
        return json.dumps({
            "host": socket.gethostname(), "pid": pid, "machine": _machine(), "process_start": _process_start(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "heartbeat": time.time(),
            "token": self.token,
        }, indent=2) + "\n"

    def _read(self):
        """The lease's text, or None when there is none."""
        try:
            if self.remote:
                if not files.gfile().exists(self.path):
                    return None
                with files.gfile().GFile(self.path) as f:
                    return f.read()
            with open(self.path) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except Exception as e:  # gone between exists and read (gs://): as if never there
            if type(e).__name__ == "NotFoundError":
                return None
            raise

    def _create(self):
        """Writes this process's lease where none is; False when another process's got there first."""
        text = self._content()
        if self.remote:
            if self._read() is not None:
                return False
            self._write(text)
            return self._confirm()
        tmp = f"{self.path}.tmp-{os.getpid()}"
        files.write_atomic(tmp, text)
        try:
            os.link(tmp, self.path)  # fails when the name exists, unlike a rename
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: an exclusive create, written in place
            try:
                with open(self.path, "x") as f:
                    f.write(text)
                return True
            except FileExistsError:
                return False
        finally:
            files.remove(tmp)

    def _replace(self, stale_text):
        """Replaces the stale lease read as stale_text; False when another process changed it first."""
        if self.remote:
            if self._read() != stale_text:
                return False
            self._write(self._content())
            return self._confirm()
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)  # one process moves a given file; the others find it gone
        except FileNotFoundError:
            return False
        with open(aside) as f:
            moved = f.read()
        if moved != stale_text:  # a newer lease, another trainer's takeover: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        files.remove(aside)
        return moved == stale_text and self._create()

    def _write(self, text):
        files.write_atomic(self.path, text)

    def _confirm(self):
        """On gs://, whether this process's write is the one that stayed, once racing writers have landed."""
        self._stop.wait(self.confirm_s)
        lease = _parse(self._read() or "")
        return bool(lease) and lease.get("token") == self.token

    def _beat(self):
        while not self._stop.wait(self.heartbeat_s):
            try:
                lease = _parse(self._read() or "")
                if not lease or lease.get("token") != self.token:
                    holder = describe(lease) if lease else "nobody"
                    cli.say(f"warning: the lease {self.path} is now held by {holder}; two trainers may be writing "
                            "this job-dir")
                    return
                self._write(json.dumps({**lease, "heartbeat": time.time()}, indent=2) + "\n")
            except Exception:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                continue


def _parse(text):
    """The lease as a dict, or None for a damaged one."""
    try:
        lease = json.loads(text)
    except ValueError:
        return None
    if not isinstance(lease, dict) or not isinstance(lease.get("heartbeat"), (int, float)):
        return None
    return lease
