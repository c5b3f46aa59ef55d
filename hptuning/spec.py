"""The study config: a YAML (or JSON) file in either of two shapes, read into one frozen
StudySpec and validated once, before anything touches storage or starts a trial.

Shape 1 is a Vertex AI hyperparameter tuning job (or its bare StudySpec), as
the console exports it or the SDK writes it (YAML or JSON; vertex.py reads
every variant), so a user brings theirs unchanged; its trialJobSpec says which
trainer runs, with which args and environment. Shape 2 is ours: the same
content, flatter, in snake_case. Both take our additions (trainer_flags,
flagfile, sampler, early_stopping, trainer_command) at the top level.
"""

import dataclasses
import json
import os
import shlex
import sys

import yaml

from hptuning import params as params_lib
from hptuning import vertex
from trainer import schema
from trainer.cli import UserError

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp")
EARLY_STOPPING = ("none", "median", "hyperband", "successive_halving")
GOALS = ("maximize", "minimize")
MEASUREMENTS = ("best", "last")
OURS = ("trainer_flags", "flagfile", "sampler", "early_stopping", "trainer_command", "trial_timeout")
FLAT_KEYS = ("metric", "goal", "measurement", "parameters", "max_trial_count", "parallel_trial_count",
             "max_failed_trial_count", *OURS)
BUILTIN_TRAINER = ("-m", "trainer.task")  # after the Python interpreter
DEFAULT_MAX_FAILED = 3  # Vertex "decides" when maxFailedTrialCount is 0; we decide 3


@dataclasses.dataclass(frozen=True)
class StudySpec:
    metric: str
    goal: str  # maximize | minimize
    measurement: str  # best | last: which evaluation is the trial's value
    parameters: tuple  # of params.Param
    max_trial_count: int  # finished (complete + pruned) trials across every worker
    parallel_trial_count: int  # trials at once in one driver process
    max_failed_trial_count: int  # failed trials (not retried) that stop the study
    sampler: dict  # {"type": one of SAMPLERS, **Optuna constructor settings}
    early_stopping: dict  # {"type": one of EARLY_STOPPING, **Optuna pruner settings}
    trainer_flags: tuple  # (("flag", "value"), ...) the same for every trial
    flagfile: str  # absolute path, or ""
    trainer_command: tuple  # argv prefix that runs the trainer
    trainer_env: tuple = ()  # (("NAME", "value"), ...) added to every trial's environment
    trial_timeout: float = 0.0  # seconds a trial may run before it is stopped and fails; 0 = no limit

    def describe(self):
        """What must not change when a study is resumed (stored with the study)."""
        return {"metric": self.metric, "goal": self.goal,
                "parameters": [dataclasses.asdict(p) for p in self.parameters]}


def load(path):
    """Reads and validates the study config at path: YAML, or JSON as the Vertex AI SDK writes it."""
    try:
        with open(path) as f:
            text = f.read()
        raw = _json(text)
        if raw is None:
            raw = yaml.safe_load(text)
    except OSError as e:
        raise UserError(f"--study_config={path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"--study_config={path}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"--study_config={path}: expected a mapping of keys (metric, parameters, ...) at the top")
    return from_vertex(raw) if vertex.is_vertex(raw) else from_flat(raw)


def _json(text):
    """JSON read as JSON (YAML would take 1e-05 for a string); None when it is not."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None  # a YAML flow mapping, or a mistake YAML names with its line


def from_flat(raw):
    params_lib.check_keys(raw, FLAT_KEYS, "study config")
    if "parameters" not in raw:
        raise UserError("parameters: missing; give the trainer flags to tune")
    metric = raw.get("metric", "top_1_accuracy")
    goal = str(raw.get("goal", "maximize")).lower()
    return _finish(raw, metric, goal, raw.get("measurement", "best"), params_lib.parse_flat(raw["parameters"]),
                   raw.get("max_trial_count"), raw.get("parallel_trial_count", 1),
                   raw.get("max_failed_trial_count", 0), raw.get("sampler", "tpe"),
                   raw.get("early_stopping", "none"), raw.get("trainer_flags") or {},
                   _command(raw.get("trainer_command")), timeout=raw.get("trial_timeout"))


def from_vertex(raw):
    """A Vertex AI job (or bare StudySpec), as any of Google's clients writes it (hptuning/vertex.py)."""
    doc = vertex.normalise(raw, OURS)
    search = vertex.read_study(doc["studySpec"], doc.get("sampler"), doc.get("early_stopping"))
    command, args, env = vertex.trial_job(doc.get("trialJobSpec"))
    timeout = doc.get("trial_timeout", vertex.trial_timeout(doc.get("trialJobSpec")))
    if command and "trainer_command" in doc:
        raise UserError("give trialJobSpec's command (or pythonModule) or trainer_command, not both")
    command = _command(doc.get("trainer_command", command))
    flags = {}
    if command[1:] == BUILTIN_TRAINER:  # the built-in trainer's args are read as flags, checked like ours
        flags = vertex.flag_args(args, schema.flag_types())
    else:  # another trainer gets them as written, before the driver's flags (as Vertex passes them)
        command += tuple(vertex.verbatim_args(args))
    ours = doc.get("trainer_flags") or {}
    if not isinstance(ours, dict):
        raise UserError(f"trainer_flags: expected a mapping of flag: value, got {ours!r}")
    flags.update(ours)  # after the args: ours win
    if "flagfile" in flags and "flagfile" not in doc:
        doc["flagfile"] = flags.pop("flagfile")
    return _finish(doc, search["metric"], search["goal"], search["measurement"], search["parameters"],
                   doc.get("maxTrialCount"), doc.get("parallelTrialCount", 1), doc.get("maxFailedTrialCount", 0),
                   search["sampler"], search["stopping"], flags, command, env, timeout)


def _finish(raw, metric, goal, measurement, parameters, max_trials, parallel, max_failed, sampler, stopping, flags,
            command, env=(), timeout=None):
    if goal not in GOALS:
        raise UserError(f"goal: {goal!r}; valid: {', '.join(GOALS)}")
    if measurement not in MEASUREMENTS:
        raise UserError(f"measurement: {measurement!r}; valid: {', '.join(MEASUREMENTS)}")
    if not isinstance(metric, str) or not metric:
        raise UserError(f"metric: expected a metric name like top_1_accuracy, got {metric!r}")
    params_lib.check_consistent(parameters)
    sampler = _settings("sampler", sampler, SAMPLERS)
    if max_trials is None and sampler["type"] != "grid":
        raise UserError("max_trial_count (maxTrialCount): missing; how many trials should the study run?")
    if sampler["type"] == "grid":
        size = _grid_size(parameters)  # checks that every parameter has finite choices
        max_trials = size if max_trials is None else max_trials
    if not isinstance(flags, dict):
        raise UserError(f"trainer_flags: expected a mapping of flag: value, got {flags!r}")
    return StudySpec(
        metric=metric, goal=goal, measurement=measurement, parameters=parameters,
        max_trial_count=_count("max_trial_count", max_trials, 1),
        parallel_trial_count=_count("parallel_trial_count", parallel, 1),
        max_failed_trial_count=_count("max_failed_trial_count", max_failed, 0) or DEFAULT_MAX_FAILED,
        sampler=sampler, early_stopping=_settings("early_stopping", stopping, EARLY_STOPPING),
        trainer_flags=tuple((str(k), params_lib.flag_text(v)) for k, v in flags.items()),
        flagfile=_flagfile(raw.get("flagfile")), trainer_command=command, trainer_env=env,
        trial_timeout=_timeout(timeout))


def _timeout(value):
    """trial_timeout: seconds as a number, or a duration with its unit ('90m', '2h', Vertex's '3600s'); 0 = none."""
    if value is None:
        return 0.0
    from trainer.config import duration_seconds

    seconds = value if isinstance(value, (int, float)) and not isinstance(value, bool) else (
        duration_seconds(value) if isinstance(value, str) and value.strip()[-1:].lower() in "smh" else None)
    if seconds is None or not 0 <= seconds < float("inf"):
        raise UserError(f"trial_timeout: {value!r}; give seconds, or a duration like '90m', '2h' or '3600s'")
    return float(seconds)


def _grid_size(parameters):
    size = 1
    for values in params_lib.grid(parameters).values():
        size *= len(values)
    return size


def _count(key, value, minimum):
    try:
        number = int(str(value))
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise UserError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return number


def _settings(key, value, kinds):
    """`tpe` or {type: tpe, seed: 0, ...}: the settings go to Optuna's constructor."""
    settings = dict(value) if isinstance(value, dict) else {"type": value}
    if settings.get("type") not in kinds:
        raise UserError(f"{key}: {settings.get('type')!r} is not supported; valid: {', '.join(kinds)}")
    return settings


def _flagfile(path):
    if not path:
        return ""
    if not os.path.isfile(path):
        raise UserError(f"flagfile: {path} does not exist (relative paths start from the current directory)")
    return os.path.abspath(path)


def is_builtin_trainer(spec):
    """True when the trials run `python -m trainer.task` (whose flag table and metrics the driver knows)."""
    return tuple(spec.trainer_command[1:]) == BUILTIN_TRAINER


def _command(command):
    if command is None:
        return (sys.executable, *BUILTIN_TRAINER)
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if not argv:
        raise UserError("trainer_command: empty; leave it out to run `python -m trainer.task`")
    return tuple(sys.executable if a == "python" else a for a in argv)
