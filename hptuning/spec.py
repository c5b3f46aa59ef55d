"""The study config: a YAML file in either of two shapes, read into one frozen
StudySpec and validated once, before anything touches storage or starts a trial.

Shape 1 is a Vertex AI hyperparameter tuning job config (a `studySpec` with
camelCase keys, plus maxTrialCount, parallelTrialCount, maxFailedTrialCount,
trialJobSpec), so a user brings theirs unchanged. Shape 2 is ours: the same
content, flatter, in snake_case. Both take our additions (trainer_flags,
flagfile, sampler, early_stopping, trainer_command) at the top level.
"""

import dataclasses
import os
import shlex
import sys

import yaml

from hptuning import params as params_lib
from trainer.cli import UserError

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp")
EARLY_STOPPING = ("none", "median", "hyperband", "successive_halving")
GOALS = ("maximize", "minimize")
MEASUREMENTS = ("best", "last")
OURS = ("trainer_flags", "flagfile", "sampler", "early_stopping", "trainer_command")
FLAT_KEYS = ("metric", "goal", "measurement", "parameters", "max_trial_count", "parallel_trial_count",
             "max_failed_trial_count", *OURS)
VERTEX_KEYS = ("studySpec", "maxTrialCount", "parallelTrialCount", "maxFailedTrialCount", "displayName",
               "trialJobSpec", *OURS)
VERTEX_STUDY_KEYS = ("metrics", "parameters", "algorithm", "measurementSelectionType", "observationNoise",
                     "medianAutomatedStoppingSpec", "decayCurveStoppingSpec", "convexAutomatedStoppingSpec",
                     "convexStopConfig", "studyStoppingConfig")
VERTEX_ALGORITHMS = {"ALGORITHM_UNSPECIFIED": "tpe", "RANDOM_SEARCH": "random", "GRID_SEARCH": "grid"}
# Vertex's own early stopping has no Optuna twin; the median rule is the closest.
VERTEX_STOPPING = ("medianAutomatedStoppingSpec", "decayCurveStoppingSpec", "convexAutomatedStoppingSpec")
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

    def describe(self):
        """What must not change when a study is resumed (stored with the study)."""
        return {"metric": self.metric, "goal": self.goal,
                "parameters": [dataclasses.asdict(p) for p in self.parameters]}


def load(path):
    """Reads and validates the YAML study config at path."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"--study_config={path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"--study_config={path}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"--study_config={path}: expected a mapping of keys (metric, parameters, ...) at the top")
    return from_vertex(raw) if "studySpec" in raw else from_flat(raw)


def from_flat(raw):
    params_lib.check_keys(raw, FLAT_KEYS, "study config")
    if "parameters" not in raw:
        raise UserError("parameters: missing; give the trainer flags to tune")
    metric = raw.get("metric", "top_1_accuracy")
    goal = str(raw.get("goal", "maximize")).lower()
    return _finish(raw, metric, goal, raw.get("measurement", "best"), params_lib.parse_flat(raw["parameters"]),
                   raw.get("max_trial_count"), raw.get("parallel_trial_count", 1),
                   raw.get("max_failed_trial_count", 0), raw.get("sampler", "tpe"),
                   raw.get("early_stopping", "none"), raw.get("trainer_flags") or {})


def from_vertex(raw):
    params_lib.check_keys(raw, VERTEX_KEYS, "study config")
    study = raw["studySpec"]
    params_lib.check_keys(study, VERTEX_STUDY_KEYS, "studySpec")
    metrics = study.get("metrics")
    if not isinstance(metrics, list) or len(metrics) != 1:
        raise UserError("studySpec.metrics: give exactly one metric (multi-objective studies are not supported)")
    params_lib.check_keys(metrics[0], ("metricId", "goal", "safetyConfig"), "studySpec.metrics[0]")
    if "safetyConfig" in metrics[0]:
        raise UserError("studySpec.metrics[0].safetyConfig: safety metrics are not supported")
    goal = str(metrics[0].get("goal", "MAXIMIZE")).lower()
    measurement = {"BEST_MEASUREMENT": "best", "LAST_MEASUREMENT": "last", "MEASUREMENT_SELECTION_TYPE_UNSPECIFIED":
                   "best"}.get(study.get("measurementSelectionType", "BEST_MEASUREMENT"), "unknown")
    if measurement == "unknown":
        raise UserError("studySpec.measurementSelectionType: valid: BEST_MEASUREMENT, LAST_MEASUREMENT")
    sampler = raw.get("sampler")
    if "algorithm" in study:
        if sampler is not None:
            raise UserError("give studySpec.algorithm or sampler, not both")
        if study["algorithm"] not in VERTEX_ALGORITHMS:
            raise UserError(f"studySpec.algorithm: {study['algorithm']!r}; valid: {', '.join(VERTEX_ALGORITHMS)}")
        sampler = VERTEX_ALGORITHMS[study["algorithm"]]
    stopping = raw.get("early_stopping")
    vertex_stopping = [key for key in VERTEX_STOPPING if key in study]
    if vertex_stopping:
        if stopping is not None:
            raise UserError(f"give studySpec.{vertex_stopping[0]} or early_stopping, not both")
        for key in vertex_stopping:
            if key != "convexAutomatedStoppingSpec":
                params_lib.check_keys(study[key] or {}, ("useElapsedDuration",), f"studySpec.{key}")
            if (study[key] or {}).get("useElapsedDuration"):
                raise UserError(f"studySpec.{key}.useElapsedDuration: not supported; the median rule compares "
                                f"trials at equal training steps (leave it out or false)")
        stopping = "median"
    flags = raw.get("trainer_flags") or _job_spec_args(raw.get("trialJobSpec"))
    if "flagfile" in flags and "flagfile" not in raw:
        raw = dict(raw, flagfile=flags.pop("flagfile"))
    return _finish(raw, metrics[0].get("metricId", "top_1_accuracy"), goal, measurement,
                   params_lib.parse_vertex(study.get("parameters")), raw.get("maxTrialCount"),
                   raw.get("parallelTrialCount", 1), raw.get("maxFailedTrialCount", 0), sampler or "tpe",
                   stopping or "none", flags)


def _job_spec_args(job_spec):
    """The trainer args of a Vertex trialJobSpec become the fixed trainer flags."""
    if not job_spec:
        return {}
    pools = job_spec.get("workerPoolSpecs") if isinstance(job_spec, dict) else None
    pool = pools[0] if isinstance(pools, list) and pools and isinstance(pools[0], dict) else {}
    code = pool.get("containerSpec") or pool.get("pythonPackageSpec") or {}
    flags = {}
    for arg in code.get("args") or []:
        name, sep, value = str(arg).lstrip("-").partition("=")
        if not str(arg).startswith("--") or not sep:
            raise UserError(f"trialJobSpec args: {arg!r}: expected --flag=value")
        flags[name] = value
    return flags


def _finish(raw, metric, goal, measurement, parameters, max_trials, parallel, max_failed, sampler, stopping, flags):
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
        flagfile=_flagfile(raw.get("flagfile")), trainer_command=_command(raw.get("trainer_command")))


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
