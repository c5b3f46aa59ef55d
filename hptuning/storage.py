"""Where the study lives: the Optuna RDB storage (SQLite in the job-dir for one
process, PostgreSQL for several), the heartbeat that lets workers notice a
killed one, and resuming a study without rerunning finished trials.
"""

import fcntl
import json
import os
import socket
import threading

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hptuning.runner import USER_ERROR
from trainer.cli import UserError

MAX_RETRIES = 2  # a trial whose worker or trainer was killed runs again at most this often
SPEC_ATTR = "hptuning_spec"


def default_url(job_dir):
    return f"sqlite:///{os.path.abspath(os.path.join(job_dir, 'study.db'))}"


def shown(url):
    """The URL without its password, for messages and summaries."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - whatever it cannot parse is shown from after the password
        return url.split("@")[-1]


def lock_sqlite(url):
    """SQLite is for one driver process: hold a lock on the file for the whole run."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UserError(f"--storage={url}: not a database URL; e.g. postgresql://user:pass@host/db") from None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    handle = open(f"{os.path.abspath(parsed.database)}.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        raise UserError(
            f"--storage={url}: {owner} is already running a study on this SQLite file; SQLite is for one "
            f"driver process (its file locking breaks down under several writers). To spread a study over "
            f"several processes or machines, give each the same --storage=postgresql://...") from None
    handle.truncate(0)
    handle.write(f"hptuning.study pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def retry_callback():
    """Queues a failed trial's parameters again (up to MAX_RETRIES times) as a new trial."""
    # Optuna 4.9 renamed RetryFailedTrialCallback; setup.py allows versions on both sides.
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return (cls or optuna.storages.RetryFailedTrialCallback)(max_retry=MAX_RETRIES)


class _Storage(RDBStorage):
    """RDBStorage whose trial state changes are atomic among this process's threads.

    Two threads popping the same queued (WAITING) trial would both run it: the
    row lock that prevents that on PostgreSQL does not exist in SQLite.
    """

    _state_lock = threading.Lock()

    def set_trial_state_values(self, trial_id, state, values=None):
        with self._state_lock:
            return super().set_trial_state_values(trial_id, state, values)


def _with_driver(url):
    """postgresql:// means psycopg 3 to SQLAlchemy 2.1; use psycopg2 when only that is installed."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_storage(url, heartbeat_interval):
    """Connects (or fails with one line) before any study is created."""
    stale = "heartbeat_stale_trial_callback"
    if not hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        stale = "failed_trial_callback"
    import sqlalchemy

    for attempt in range(5):
        try:
            return _Storage(_with_driver(url), heartbeat_interval=heartbeat_interval,
                            grace_period=2 * heartbeat_interval, engine_kwargs=_engine_kwargs(url),
                            **{stale: retry_callback()})
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started together on a new database race to create Optuna's tables;
            # the loser finds them made on its next try.
            if attempt == 4:
                raise UserError(f"--storage={shown(url)}: could not create Optuna's tables") from None
        except ImportError as e:
            raise UserError(f"--storage={shown(url)}: the database driver is missing ({e}); "
                            f"for PostgreSQL: pip install psycopg2-binary") from None
        except Exception as e:  # noqa: BLE001 - sqlalchemy's and the driver's: bad URL, refused connection, bad password
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise UserError(f"--storage={shown(url)}: cannot open the study storage: {reason}") from None


def _engine_kwargs(url):
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def open_study(storage, name, spec, sampler, pruner):
    """Creates the study, or loads it when the same command runs again."""
    direction = "maximize" if spec.goal == "maximize" else "minimize"
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    wanted = json.loads(json.dumps(spec.describe()))
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, wanted)
    elif stored != wanted:
        changed = sorted(key for key in wanted if wanted[key] != stored.get(key))
        raise UserError(f"study {name!r} exists in that storage with a different {' and '.join(changed)}; "
                        f"resume it with its original study config, or pick a new --study_name or --job-dir")
    return study


def fail_dead_local_trials(study, storage):
    """Fails (and retries) RUNNING trials whose driver on this host is gone.

    The heartbeat finds a killed worker on any machine after its grace period;
    on the same host we know at once, so a restarted worker resumes at once.
    """
    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _driver_alive(int(pid)):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "failure", "its driver process was killed")
        if storage.set_trial_state_values(trial_id, TrialState.FAIL):
            retry_callback()(study, storage.get_trial(trial_id))
            yield trial.number


def requeue_stopped(study):
    """Queues again the trials that stopped for no fault of their parameters: [(number, why), ...].

    A trial a stopped driver interrupted, and one whose trainer met a user
    error that stopped the study (fixed, presumably, before this run): neither
    counts as a failure, and the defaults' trial is not lost.
    """
    from hptuning.outputs import retried_numbers, runs_again

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for trial in trials:
        if trial.state != TrialState.FAIL or trial.number in retried or not runs_again(trial):
            continue  # a trial stopped MAX_RETRIES + 1 times counts as failed instead
        if trial.user_attrs.get("interrupted"):
            why = "was interrupted"
        elif trial.user_attrs.get(USER_ERROR):
            why = "stopped the study with a user error"
        else:
            continue
        retry_callback()(study, trial)
        yield trial.number, why


def _driver_alive(pid):
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"hptuning" in f.read()  # the pid may have been reused by something else
    except OSError:
        return False
