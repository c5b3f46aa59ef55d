"""Vertex AI tuning documents: a HyperparameterTuningJob (or a bare StudySpec)
in any form Google's clients write it, read into the search, the counts and the
trial's trainer (command, args, env).

normalise() brings every serialisation to one form first: camelCase keys (the
SDK's to_dict writes snake_case), enum names (its to_json writes integers), the
zero values protobuf JSON leaves out (`minValue: 0`), and a bare StudySpec
under `studySpec`. Everything after it reads only that form. Output-only
fields (a job exported from the console) are dropped with one note; a field
that would change the search but has no equivalent here is refused by name.
"""

import re

from hptuning import params as params_lib
from trainer.cli import UserError, say

# HyperparameterTuningJob's fields (google.cloud.aiplatform_v1), by what they mean here.
OUTPUT_ONLY = ("name", "trials", "state", "createTime", "startTime", "endTime", "updateTime", "error",
               "satisfiesPzs", "satisfiesPzi")
NO_EFFECT = ("displayName", "labels", "encryptionSpec")  # inputs that leave the search as it is
JOB_KEYS = ("studySpec", "maxTrialCount", "parallelTrialCount", "maxFailedTrialCount", "trialJobSpec",
            *NO_EFFECT, *OUTPUT_ONLY)
# A StudySpec's fields (v1, and v1beta1's convexStopConfig and transferLearningConfig).
STUDY_KEYS = ("metrics", "parameters", "algorithm", "measurementSelectionType", "observationNoise",
              "medianAutomatedStoppingSpec", "decayCurveStoppingSpec", "convexAutomatedStoppingSpec",
              "convexStopConfig", "studyStoppingConfig", "transferLearningConfig")
# Vertex's early-stopping rules and their settings. None has an Optuna twin: the median rule stands in,
# with its own settings, so a rule's settings (other than zeros, which mean "unset") are refused.
STOPPING = {
    "medianAutomatedStoppingSpec": ("useElapsedDuration",),
    "decayCurveStoppingSpec": ("useElapsedDuration",),
    "convexAutomatedStoppingSpec": ("maxStepCount", "minStepCount", "minMeasurementCount",
                                    "learningRateParameterName", "useElapsedDuration", "updateAllStoppedTrials"),
    "convexStopConfig": ("maxNumSteps", "minNumSteps", "autoregressiveOrder", "learningRateParameterName",
                         "useSeconds"),
}
# Settings that would end the study early or seed it from other studies; the study here ends at maxTrialCount.
NOT_SUPPORTED = {
    "studyStoppingConfig": ("shouldStopAsap", "minimumRuntimeConstraint", "maximumRuntimeConstraint", "minNumTrials",
                            "maxNumTrials", "maxNumTrialsNoProgress", "maxDurationNoProgress"),
    "transferLearningConfig": ("priorStudyNames", "disableTransferLearning"),
}
HARMLESS = ("disableTransferLearning",)  # true is what happens here anyway
# Enum values by number, as the SDK's to_json / to_dict write them (use_integers_for_enums=True, its default).
ENUMS = {
    "goal": ("GOAL_TYPE_UNSPECIFIED", "MAXIMIZE", "MINIMIZE"),
    "scaleType": ("SCALE_TYPE_UNSPECIFIED", "UNIT_LINEAR_SCALE", "UNIT_LOG_SCALE", "UNIT_REVERSE_LOG_SCALE"),
    "algorithm": ("ALGORITHM_UNSPECIFIED", None, "GRID_SEARCH", "RANDOM_SEARCH"),
    "observationNoise": ("OBSERVATION_NOISE_UNSPECIFIED", "LOW", "HIGH"),
    "measurementSelectionType": ("MEASUREMENT_SELECTION_TYPE_UNSPECIFIED", "LAST_MEASUREMENT", "BEST_MEASUREMENT"),
}
CODE_KEYS = {"containerSpec": ("imageUri", "command", "args", "env"),
             "pythonPackageSpec": ("executorImageUri", "packageUris", "pythonModule", "args", "env")}
ALGORITHMS = {"ALGORITHM_UNSPECIFIED": "tpe", "RANDOM_SEARCH": "random", "GRID_SEARCH": "grid"}
MEASUREMENTS = {"BEST_MEASUREMENT": "best", "LAST_MEASUREMENT": "last", "MEASUREMENT_SELECTION_TYPE_UNSPECIFIED": "best"}
JOB_DIR_FLAGS = ("job-dir", "job_dir")


def is_vertex(raw):
    """A job (studySpec) or a bare StudySpec (metrics and a list of parameters; ours has a mapping)."""
    return "studySpec" in raw or "study_spec" in raw or ("metrics" in raw and isinstance(raw.get("parameters"), list))


def normalise(raw, ours):
    """The document in camelCase with enum names and protobuf's omitted zeros; `ours` (our additions) as given."""
    doc = {}
    for key, value in raw.items():
        name = key if key in ours else _camel(key)
        if name in doc:
            raise UserError(f"{key}: given twice (also as {name})")
        doc[name] = value if key in ours or name == "labels" else _camel_keys(value)
    if "studySpec" not in doc:  # a bare StudySpec: its fields move under studySpec; counts and ours stay beside
        doc["studySpec"] = {key: doc.pop(key) for key in list(doc) if key in STUDY_KEYS}
    params_lib.check_keys(doc, (*JOB_KEYS, *ours), "study config")
    ignored = [key for key in OUTPUT_ONLY if _given(doc.pop(key, None))]
    if ignored:
        say(f"note: ignoring the output-only fields of the Vertex AI job: {', '.join(ignored)}")
    for key in ("maxTrialCount", "parallelTrialCount", "maxFailedTrialCount"):
        if doc.get(key) in (0, "0"):  # protobuf's zero is "not set"
            del doc[key]
    study = doc["studySpec"]
    params_lib.check_keys(study, STUDY_KEYS, "studySpec")
    _name_enums(study)
    for spec in _parameter_specs(study.get("parameters")):
        for key in ("doubleValueSpec", "integerValueSpec"):
            if isinstance(spec.get(key), dict):  # protobuf JSON leaves out a 0 bound
                spec[key] = {"minValue": 0, "maxValue": 0, **spec[key]}
    return doc


def _camel(key):
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), key) if isinstance(key, str) else key


def _camel_keys(value):
    if isinstance(value, dict):
        return {_camel(k): (v if k == "labels" else _camel_keys(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_keys(v) for v in value]
    return value


def _name_enums(value):
    """Integer enums to their names, in place, wherever an enum field of the StudySpec sits."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in list(items):
        names = ENUMS.get(key) if isinstance(value, dict) else None
        if names and isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(names) and names[item]:
            value[key] = names[item]
        else:
            _name_enums(item)


def _parameter_specs(parameters):
    """Every ParameterSpec mapping, conditional ones included (the malformed are left to the parser)."""
    for spec in parameters if isinstance(parameters, list) else ():
        if isinstance(spec, dict):
            yield spec
            for cond in spec.get("conditionalParameterSpecs") or ():
                if isinstance(cond, dict):
                    yield from _parameter_specs([cond.get("parameterSpec")])


def _given(value):
    """Set to something other than protobuf's zero ("", 0, false, empty, an enum's *_UNSPECIFIED)."""
    if isinstance(value, dict):
        return any(_given(v) for v in value.values())
    if isinstance(value, str) and value.endswith("_UNSPECIFIED"):
        return False
    return value not in (None, "", 0, "0", False, [])


def read_study(study, sampler, stopping):
    """The search a normalised studySpec describes: metric, goal, measurement, parameters, sampler, stopping.

    sampler / stopping: ours beside it, if given (either theirs or ours, not both).
    """
    metrics = study.get("metrics")
    if not isinstance(metrics, list) or len(metrics) != 1:
        raise UserError("studySpec.metrics: give exactly one metric (multi-objective studies are not supported)")
    params_lib.check_keys(metrics[0], ("metricId", "goal", "safetyConfig"), "studySpec.metrics[0]")
    if _given(metrics[0].get("safetyConfig")):
        raise UserError("studySpec.metrics[0].safetyConfig: safety metrics are not supported")
    measurement = MEASUREMENTS.get(study.get("measurementSelectionType", "BEST_MEASUREMENT"))
    if measurement is None:
        raise UserError("studySpec.measurementSelectionType: valid: BEST_MEASUREMENT, LAST_MEASUREMENT")
    # ALGORITHM_UNSPECIFIED is what an SDK dump writes when nobody chose: our sampler may choose.
    if study.get("algorithm", "ALGORITHM_UNSPECIFIED") != "ALGORITHM_UNSPECIFIED" or (
            "algorithm" in study and sampler is None):
        if sampler is not None:
            raise UserError("give studySpec.algorithm or sampler, not both")
        if study["algorithm"] not in ALGORITHMS:
            raise UserError(f"studySpec.algorithm: {study['algorithm']!r}; valid: {', '.join(ALGORITHMS)}")
        sampler = ALGORITHMS[study["algorithm"]]
    for key, fields in NOT_SUPPORTED.items():
        settings = study.get(key) or {}
        params_lib.check_keys(settings, fields, f"studySpec.{key}")
        for setting in fields:
            if setting not in HARMLESS and _given(settings.get(setting)):
                raise UserError(f"studySpec.{key}.{setting}: not supported; the study ends at maxTrialCount and "
                                f"starts from no other study (leave it out)")
    rules = [key for key in STOPPING if key in study]
    if len(rules) > 1:
        raise UserError(f"studySpec: give one early-stopping rule, not {' and '.join(rules)}")
    if rules:
        if stopping is not None:
            raise UserError(f"give studySpec.{rules[0]} or early_stopping, not both")
        _check_stopping(rules[0], study[rules[0]])
        stopping = "median"
    return {"metric": metrics[0].get("metricId", "top_1_accuracy"),
            "goal": str(metrics[0].get("goal", "MAXIMIZE")).lower(), "measurement": measurement,
            "parameters": params_lib.parse_vertex(study.get("parameters")), "sampler": sampler or "tpe",
            "stopping": stopping or "none"}


def _check_stopping(rule, settings):
    settings = settings or {}
    params_lib.check_keys(settings, STOPPING[rule], f"studySpec.{rule}")
    for setting in STOPPING[rule]:
        if not _given(settings.get(setting)):
            continue
        if setting in ("useElapsedDuration", "useSeconds"):
            raise UserError(f"studySpec.{rule}.{setting}: not supported; the median rule compares trials at equal "
                            f"training steps (leave it out or false)")
        raise UserError(f"studySpec.{rule}.{setting}: not supported; Vertex's rule has no Optuna twin, the median "
                        f"rule stands in (leave the setting out, or set early_stopping: {{type: median, ...}} instead "
                        f"of studySpec.{rule})")


def trial_job(job_spec):
    """The trainer of trialJobSpec's first worker pool: (command argv or None, args, env pairs).

    command: containerSpec.command, or `python -m MODULE` for pythonPackageSpec.pythonModule; None when the
    container's own entrypoint would run (this package's image: the built-in trainer).
    """
    if not job_spec:
        return None, [], ()
    _mapping(job_spec, "trialJobSpec")  # its fields other than the first pool's code say where trials run
    pools = job_spec.get("workerPoolSpecs") or [{}]
    if not isinstance(pools, list) or not isinstance(pools[0], dict):
        raise UserError("trialJobSpec.workerPoolSpecs: expected a list of worker pool specs")
    given = [key for key in ("containerSpec", "pythonPackageSpec") if pools[0].get(key)]
    if len(given) > 1:
        raise UserError("trialJobSpec.workerPoolSpecs[0]: give containerSpec or pythonPackageSpec, not both")
    if not given:
        return None, [], ()
    where = f"trialJobSpec.workerPoolSpecs[0].{given[0]}"
    code = pools[0][given[0]]
    params_lib.check_keys(code, CODE_KEYS[given[0]], where)  # a misspelt command must not run another trainer
    command = _strings(code.get("command"), f"{where}.command")
    if code.get("pythonModule"):
        command = ["python", "-m", str(code["pythonModule"])]
    env = []
    for i, var in enumerate(code.get("env") or []):
        if not isinstance(var, dict) or not var.get("name"):
            raise UserError(f"{where}.env[{i}]: expected {{name: NAME, value: VALUE}}, got {var!r}")
        value = var.get("value")  # protobuf JSON leaves out an empty value
        env.append((str(var["name"]), "" if value is None else str(value)))
    return command or None, _strings(code.get("args"), f"{where}.args"), tuple(env)


def trial_timeout(job_spec):
    """trialJobSpec.scheduling.timeout ('86400s', or seconds) when the job spec gives one, else None."""
    scheduling = (job_spec or {}).get("scheduling") or {}
    return scheduling.get("timeout") if isinstance(scheduling, dict) else None


def _mapping(value, where):
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")


def _strings(value, where):
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: expected a list of strings, got {value!r}")
    return [str(v) for v in value]


def flag_args(args, flag_types):
    """The built-in trainer's args as {flag: value}: --flag=value, --flag value, and absl's --flag and --noflag
    for a boolean. flag_types: {flag: absl type}; an unknown flag is kept, for the flag check to name.

    The job-dir is dropped: each trial gets its own.
    """
    booleans = [name for name, kind in flag_types.items() if kind == "bool"]
    flags, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not _is_flag(arg):
            raise UserError(f"trialJobSpec args: {arg!r}: the built-in trainer takes flags only (--flag=value)")
        name, sep, value = arg.lstrip("-").partition("=")
        if not sep:
            if name in booleans or (name.startswith("no") and name[2:] in booleans):
                name, value = (name, "true") if name in booleans else (name[2:], "false")
            elif i + 1 < len(args) and not _is_flag(args[i + 1]):
                value, i = args[i + 1], i + 1
            elif name in flag_types:
                raise UserError(f"trialJobSpec args: {arg}: expected a value (--{name}=VALUE or --{name} VALUE)")
        flags[name] = value
        i += 1
    return _without_job_dir(flags)


def _without_job_dir(flags):
    dropped = [f"--{name}={flags.pop(name)}" for name in JOB_DIR_FLAGS if name in flags]
    if dropped:
        say(f"note: ignoring trialJobSpec's {dropped[0]}: each trial gets its own job-dir under the study's")
    return flags


def verbatim_args(args):
    """A custom trainer's args as written, less the job-dir (--job-dir=X or --job-dir X): the driver gives its own."""
    kept, dropped, i = [], [], 0
    while i < len(args):
        name = args[i].lstrip("-").partition("=")[0] if _is_flag(args[i]) else None
        if name in JOB_DIR_FLAGS:
            takes_next = "=" not in args[i] and i + 1 < len(args) and not _is_flag(args[i + 1])
            dropped.append(" ".join(args[i:i + 1 + takes_next]))
            i += 1 + takes_next
            continue
        kept.append(args[i])
        i += 1
    if dropped:
        say(f"note: ignoring trialJobSpec's {dropped[0]}: each trial gets its own job-dir under the study's")
    return kept


def _is_flag(arg):
    """--name or -name (absl takes both); a negative number such as -0.5 is a value."""
    return re.match(r"--?[A-Za-z_]", arg) is not None
