"""Vertex AI tuning jobs as Google's own client writes them run unchanged.

Jobs are built with google-cloud-aiplatform's types and dumped each way the
SDK and protobuf dump them (camelCase and snake_case, string and integer enums,
zero values left out); each reads into the same StudySpec as the hand-written
config; what would change the search and is not supported is refused by name.
(A job's custom trainer, run end to end: test_hptuning_vertex_trainer.py.)
"""

import json

import pytest
import yaml
from google.cloud import aiplatform_v1 as v1
from google.protobuf import json_format

from hptuning import params as params_lib
from hptuning import runner, study, vertex
from hptuning import spec as spec_lib
from tests.hptuning_helpers import ROOT
from trainer.cli import UserError

S, P = v1.StudySpec, v1.StudySpec.ParameterSpec
Cond = P.ConditionalParameterSpec

# The job below, written by hand as the Vertex AI docs show it.
HAND_WRITTEN = """
maxTrialCount: 4
parallelTrialCount: 2
studySpec:
  metrics: [{metricId: top_1_accuracy, goal: MAXIMIZE}]
  algorithm: RANDOM_SEARCH
  measurementSelectionType: LAST_MEASUREMENT
  medianAutomatedStoppingSpec: {}
  parameters:
    - parameterId: optimizer_type
      categoricalValueSpec: {values: [momentum, adam], defaultValue: momentum}
      conditionalParameterSpecs:
        - parentCategoricalValues: {values: [adam]}
          parameterSpec:
            parameterId: initial_learning_rate
            doubleValueSpec: {minValue: 0.0003, maxValue: 0.03}
            scaleType: UNIT_LOG_SCALE
    - parameterId: label_smoothing
      doubleValueSpec: {minValue: 0, maxValue: 0.2, defaultValue: 0.1}
      scaleType: UNIT_LINEAR_SCALE
    - parameterId: warmup_steps
      integerValueSpec: {minValue: 0, maxValue: 100, defaultValue: 50}
      conditionalParameterSpecs:
        - parentIntValues: {values: [0]}
          parameterSpec:
            parameterId: warmup_learning_rate
            doubleValueSpec: {minValue: 0, maxValue: 0.01}
    - parameterId: train_batch_size
      discreteValueSpec: {values: [32, 64], defaultValue: 32}
      conditionalParameterSpecs:
        - parentDiscreteValues: {values: [64]}
          parameterSpec:
            parameterId: weight_decay
            doubleValueSpec: {minValue: 0, maxValue: 0.001}
trialJobSpec:
  workerPoolSpecs:
    - containerSpec:
        imageUri: keras-image-trainer:latest
        args: [--max_steps=20, --random_flip=false, --eval_frequency=10]
        env: [{name: GREETING, value: hello}]
"""


def sdk_job(study_spec=None, **container):
    """HAND_WRITTEN, built with the SDK's types (as aiplatform.HyperparameterTuningJob builds it)."""
    container = {"image_uri": "keras-image-trainer:latest", "env": [v1.EnvVar(name="GREETING", value="hello")],
                 # The forms a user writes: --flag value, --noflag, --flag=value, a job-dir Vertex would use.
                 "args": ["--max_steps", "20", "--norandom_flip", "--job-dir=gs://bucket/out", "--eval_frequency=10"],
                 **container}
    return v1.HyperparameterTuningJob(
        display_name="digits", study_spec=study_spec or sdk_study(), max_trial_count=4, parallel_trial_count=2,
        trial_job_spec=v1.CustomJobSpec(worker_pool_specs=[v1.WorkerPoolSpec(
            machine_spec=v1.MachineSpec(machine_type="n1-standard-4"), replica_count=1,
            container_spec=v1.ContainerSpec(**container))]))


def sdk_study():
    def child(name, low, high, **kwargs):
        return P(parameter_id=name, double_value_spec=P.DoubleValueSpec(min_value=low, max_value=high), **kwargs)
    return S(
        metrics=[S.MetricSpec(metric_id="top_1_accuracy", goal=S.MetricSpec.GoalType.MAXIMIZE)],
        algorithm=S.Algorithm.RANDOM_SEARCH, measurement_selection_type=S.MeasurementSelectionType.LAST_MEASUREMENT,
        median_automated_stopping_spec=S.MedianAutomatedStoppingSpec(),
        parameters=[
            P(parameter_id="optimizer_type",
              categorical_value_spec=P.CategoricalValueSpec(values=["momentum", "adam"], default_value="momentum"),
              conditional_parameter_specs=[Cond(
                  parent_categorical_values=Cond.CategoricalValueCondition(values=["adam"]),
                  parameter_spec=child("initial_learning_rate", 0.0003, 0.03, scale_type=P.ScaleType.UNIT_LOG_SCALE))]),
            P(parameter_id="label_smoothing", scale_type=P.ScaleType.UNIT_LINEAR_SCALE,
              double_value_spec=P.DoubleValueSpec(min_value=0.0, max_value=0.2, default_value=0.1)),
            P(parameter_id="warmup_steps",
              integer_value_spec=P.IntegerValueSpec(min_value=0, max_value=100, default_value=50),
              conditional_parameter_specs=[Cond(parent_int_values=Cond.IntValueCondition(values=[0]),
                                                parameter_spec=child("warmup_learning_rate", 0.0, 0.01))]),
            P(parameter_id="train_batch_size",  # the SDK keeps discrete values as doubles: 32.0
              discrete_value_spec=P.DiscreteValueSpec(values=[32, 64], default_value=32),
              conditional_parameter_specs=[Cond(parent_discrete_values=Cond.DiscreteValueCondition(values=[64]),
                                                parameter_spec=child("weight_decay", 0.0, 0.001))]),
        ])


def _pb(message):
    return type(message).pb(message)


SERIALISATIONS = {  # name: message -> a dict (or JSON text), as each client call writes it
    "to_dict": lambda m: type(m).to_dict(m),  # snake_case, integer enums, zeros written
    "to_dict_enum_names": lambda m: type(m).to_dict(m, use_integers_for_enums=False),
    "to_json": lambda m: type(m).to_json(m),  # camelCase, integer enums, zeros written
    "to_json_enum_names": lambda m: type(m).to_json(m, use_integers_for_enums=False),
    "MessageToJson": lambda m: json_format.MessageToJson(_pb(m)),  # camelCase, enum names, zeros left out
    "MessageToDict_snake": lambda m: json_format.MessageToDict(_pb(m), preserving_proto_field_name=True),
    "MessageToDict_int_enums": lambda m: json_format.MessageToDict(_pb(m), use_integers_for_enums=True),
}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def write(tmp_path, document, as_yaml=False, name="job"):
    """The document as the file a user hands the driver: the SDK's JSON text, or a dict dumped as JSON or YAML."""
    if isinstance(document, str):
        document = document if not as_yaml else yaml.safe_dump(json.loads(document))
    else:
        document = yaml.safe_dump(document) if as_yaml else json.dumps(document)
    path = tmp_path / f"{name}.{'yaml' if as_yaml else 'json'}"
    path.write_text(document)
    return str(path)


def load_hand_written(tmp_path, text=HAND_WRITTEN):
    path = tmp_path / "hand.yaml"
    path.write_text(text)
    return spec_lib.load(str(path))


@pytest.mark.parametrize("as_yaml", [False, True], ids=["json", "yaml"])
@pytest.mark.parametrize("serialise", SERIALISATIONS.values(), ids=SERIALISATIONS.keys())
def test_every_sdk_serialisation_of_a_job_reads_as_the_hand_written_one(tmp_path, serialise, as_yaml, capsys):
    expected = load_hand_written(tmp_path)
    spec = spec_lib.load(write(tmp_path, serialise(sdk_job()), as_yaml))
    assert spec == expected
    assert dict(spec.trainer_flags) == {"max_steps": "20", "random_flip": "false", "eval_frequency": "10"}
    assert spec.trainer_env == (("GREETING", "hello"),) and spec.max_failed_trial_count == 3
    assert spec.sampler == {"type": "random"} and spec.early_stopping == {"type": "median"}
    assert capsys.readouterr().out.splitlines() == [  # the job-dir Vertex would write to, not a mistake
        "note: ignoring trialJobSpec's --job-dir=gs://bucket/out: each trial gets its own job-dir under the study's"]
    study.check_against_trainer(spec)


@pytest.mark.parametrize("serialise", SERIALISATIONS.values(), ids=SERIALISATIONS.keys())
def test_a_bare_study_spec_reads_with_the_counts_beside_it(tmp_path, serialise):
    expected = load_hand_written(tmp_path, HAND_WRITTEN.split("trialJobSpec:")[0])
    document = serialise(sdk_study())
    document = json.loads(document) if isinstance(document, str) else document
    spec = spec_lib.load(write(tmp_path, {**document, "maxTrialCount": 4, "parallel_trial_count": 2}))
    assert spec == expected


def test_the_high_level_sdk_builds_what_the_driver_reads(tmp_path):
    """aiplatform.HyperparameterTuningJob's own construction (its parameter-spec helpers, the compat types)."""
    from google.cloud.aiplatform import hyperparameter_tuning as hpt
    from google.cloud.aiplatform.compat.types import hyperparameter_tuning_job as gca_job
    from google.cloud.aiplatform.compat.types import study as gca_study

    parameter_spec = {"initial_learning_rate": hpt.DoubleParameterSpec(min=0.001, max=0.1, scale="log"),
                      "warmup_steps": hpt.IntegerParameterSpec(min=0, max=100, scale="linear"),
                      "train_batch_size": hpt.DiscreteParameterSpec(values=[32, 64], scale="linear"),
                      "optimizer_type": hpt.CategoricalParameterSpec(values=["momentum", "adam"])}
    study_spec = gca_study.StudySpec(
        metrics=[gca_study.StudySpec.MetricSpec(metric_id="top_1_accuracy", goal="maximize".upper())],
        parameters=[p._to_parameter_spec(parameter_id=name) for name, p in parameter_spec.items()],
        algorithm=hpt.SEARCH_ALGORITHM_TO_PROTO_VALUE[None],
        measurement_selection_type=hpt.MEASUREMENT_SELECTION_TO_PROTO_VALUE["best"])
    job = gca_job.HyperparameterTuningJob(display_name="digits", study_spec=study_spec, max_trial_count=3,
                                          parallel_trial_count=1, labels={"team": "vision"})
    spec = spec_lib.load(write(tmp_path, type(job).to_dict(job)))
    assert [(p.name, p.kind, p.low, p.high, p.log, p.values) for p in spec.parameters] == [
        ("initial_learning_rate", "double", 0.001, 0.1, True, ()), ("warmup_steps", "integer", 0, 100, False, ()),
        ("train_batch_size", "discrete", None, None, False, (32, 64)),
        ("optimizer_type", "categorical", None, None, False, ("momentum", "adam"))]
    assert (spec.sampler, spec.measurement, spec.max_trial_count) == ({"type": "tpe"}, "best", 3)
    study.check_against_trainer(spec)


def test_our_enum_tables_are_the_sdks():
    for field, enum in [("goal", S.MetricSpec.GoalType), ("scaleType", P.ScaleType), ("algorithm", S.Algorithm),
                        ("observationNoise", S.ObservationNoise),
                        ("measurementSelectionType", S.MeasurementSelectionType)]:
        assert {i: name for i, name in enumerate(vertex.ENUMS[field]) if name} == {e.value: e.name for e in enum}


def test_a_discrete_default_written_as_a_double_reaches_an_int_flag_as_an_integer(tmp_path):
    spec = spec_lib.load(write(tmp_path, json_format.MessageToJson(_pb(sdk_job()))))
    assert '"defaultValue": 32.0' in json_format.MessageToJson(_pb(sdk_job()))  # as the SDK writes it
    argv = runner.trainer_argv(spec, "/jobs/trial-0000", params_lib.defaults(spec.parameters))
    assert "--train_batch_size=32" in argv and "--warmup_steps=50" in argv


@pytest.mark.parametrize("change, fragment", [
    (dict(convex_automated_stopping_spec=S.ConvexAutomatedStoppingSpec(max_step_count=100)),
     "studySpec.convexAutomatedStoppingSpec.maxStepCount: not supported"),
    (dict(convex_automated_stopping_spec=S.ConvexAutomatedStoppingSpec(learning_rate_parameter_name="lr")),
     "studySpec.convexAutomatedStoppingSpec.learningRateParameterName: not supported"),
    (dict(median_automated_stopping_spec=S.MedianAutomatedStoppingSpec(use_elapsed_duration=True)),
     "studySpec.medianAutomatedStoppingSpec.useElapsedDuration: not supported"),
    (dict(study_stopping_config=S.StudyStoppingConfig(max_num_trials={"value": 2})),
     "studySpec.studyStoppingConfig.maxNumTrials: not supported"),
    (dict(metrics=[S.MetricSpec(metric_id="top_1_accuracy", goal=1, safety_config=S.MetricSpec.SafetyMetricConfig(
        safety_threshold=0.5))]), "studySpec.metrics[0].safetyConfig: safety metrics are not supported"),
    (dict(parameters=[P(parameter_id="label_smoothing", double_value_spec=P.DoubleValueSpec(max_value=0.2),
                        scale_type=P.ScaleType.UNIT_REVERSE_LOG_SCALE)]), "scaleType: 'UNIT_REVERSE_LOG_SCALE'"),
])
@pytest.mark.parametrize("serialise", ["to_dict", "MessageToJson"])
def test_a_setting_that_would_change_the_search_is_refused_by_name(tmp_path, change, fragment, serialise):
    study_spec = sdk_study()
    for key, value in change.items():
        setattr(study_spec, key, value)
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        spec_lib.load(write(tmp_path, SERIALISATIONS[serialise](sdk_job(study_spec))))


def test_a_convex_rule_without_settings_is_the_median_rule(tmp_path):
    study_spec = sdk_study()
    study_spec.convex_automated_stopping_spec = S.ConvexAutomatedStoppingSpec()  # to_dict writes its zeros
    spec = spec_lib.load(write(tmp_path, type(sdk_job()).to_dict(sdk_job(study_spec))))
    assert spec.early_stopping == {"type": "median"}


# A job as the console's REST view (or `gcloud ai hp-tuning-jobs describe --format=json`) shows it once it ran.
CONSOLE_EXPORT = {
    "name": "projects/123/locations/us-central1/hyperparameterTuningJobs/456", "displayName": "digits",
    "state": "JOB_STATE_SUCCEEDED", "createTime": "2024-05-01T10:00:00.000Z", "startTime": "2024-05-01T10:01:00Z",
    "endTime": "2024-05-01T11:00:00Z", "updateTime": "2024-05-01T11:00:00Z", "labels": {"team": "vision"},
    "encryptionSpec": {"kmsKeyName": "projects/123/locations/us-central1/keyRings/r/cryptoKeys/k"},
    "trials": [{"id": "1", "state": "SUCCEEDED", "parameters": [{"parameterId": "warmup_steps", "value": 50}],
                "finalMeasurement": {"stepCount": "20", "metrics": [{"metricId": "top_1_accuracy", "value": 0.9}]}}],
}


def test_a_console_export_runs_with_one_note_for_its_output_only_fields(tmp_path, capsys):
    job = json.loads(json_format.MessageToJson(_pb(sdk_job())))
    job["trialJobSpec"]["workerPoolSpecs"][0]["diskSpec"] = {"bootDiskType": "pd-ssd", "bootDiskSizeGb": 100}
    spec = spec_lib.load(write(tmp_path, {**CONSOLE_EXPORT, **job}))
    assert spec == load_hand_written(tmp_path)
    notes = capsys.readouterr().out.splitlines()
    assert notes[0] == ("note: ignoring the output-only fields of the Vertex AI job: name, trials, state, createTime, "
                        "startTime, endTime, updateTime") and len(notes) == 2  # and the job-dir's


@pytest.mark.parametrize("args, fragment", [
    (["--max_steps"], "trialJobSpec args: --max_steps: expected a value"),
    (["data/train"], "'data/train': the built-in trainer takes flags only"),
])
def test_bad_builtin_trainer_args_are_named(tmp_path, args, fragment):
    with pytest.raises(UserError, match=fragment):
        spec_lib.load(write(tmp_path, type(sdk_job()).to_dict(sdk_job(args=args))))


def test_v1beta1_settings_are_read_or_refused_by_name(tmp_path):
    from google.cloud import aiplatform_v1beta1 as beta

    bs = beta.StudySpec

    def load(**settings):
        study_spec = bs(metrics=[bs.MetricSpec(metric_id="top_1_accuracy", goal=1)], parameters=[
            bs.ParameterSpec(parameter_id="label_smoothing", double_value_spec=bs.ParameterSpec.DoubleValueSpec(
                max_value=0.2))], **settings)
        job = beta.HyperparameterTuningJob(study_spec=study_spec, max_trial_count=2)
        return spec_lib.load(write(tmp_path, type(job).to_dict(job)))

    spec = load(convex_stop_config=bs.ConvexStopConfig(),
                transfer_learning_config=bs.TransferLearningConfig(disable_transfer_learning=True))
    assert spec.early_stopping == {"type": "median"} and (spec.parameters[0].low, spec.parameters[0].high) == (0, 0.2)
    with pytest.raises(UserError, match="studySpec.transferLearningConfig.priorStudyNames: not supported"):
        load(transfer_learning_config=bs.TransferLearningConfig(prior_study_names=["projects/1/studies/2"]))
    with pytest.raises(UserError, match="studySpec.convexStopConfig.minNumSteps: not supported"):
        load(convex_stop_config=bs.ConvexStopConfig(min_num_steps=10))


def test_our_sampler_beside_an_sdk_dump_that_chose_no_algorithm(tmp_path):
    unchosen = sdk_study()
    unchosen.algorithm = S.Algorithm.ALGORITHM_UNSPECIFIED
    document = type(sdk_job()).to_dict(sdk_job(unchosen))
    assert document["study_spec"]["algorithm"] == 0  # to_dict writes the zero
    spec = spec_lib.load(write(tmp_path, {**document, "sampler": {"type": "tpe", "seed": 1}}))
    assert spec.sampler == {"type": "tpe", "seed": 1}
    chosen = type(sdk_job()).to_dict(sdk_job())  # RANDOM_SEARCH
    with pytest.raises(UserError, match="give studySpec.algorithm or sampler, not both"):
        spec_lib.load(write(tmp_path, {**chosen, "sampler": "tpe"}))
