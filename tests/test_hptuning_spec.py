"""Study configs: both shapes read the same, and each kind of bad input is an
error that names the key and what would be valid (in-process, fast)."""

import os

import numpy as np
import optuna
import pytest
import yaml

from hptuning import params as params_lib
from hptuning import runner, study
from hptuning import spec as spec_lib
from trainer.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "sample_configs", "hptuning")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # the sample configs name their flag file relative to the repository


def load_text(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return spec_lib.load(str(path))


def load_dict(tmp_path, config):
    return load_text(tmp_path, yaml.safe_dump(config))


def minimal(**overrides):
    config = {"max_trial_count": 2,
              "parameters": {"initial_learning_rate": {"type": "double", "min": 0.01, "max": 1, "scale": "log"}}}
    config.update(overrides)
    return config


def test_vertex_and_flat_samples_search_the_same_space():
    flat = spec_lib.load(os.path.join(SAMPLES, "digits.yaml"))
    vertex = spec_lib.load(os.path.join(SAMPLES, "digits_vertex.yaml"))
    assert flat.describe() == vertex.describe()
    for field in ("max_trial_count", "parallel_trial_count", "max_failed_trial_count", "flagfile", "measurement"):
        assert getattr(flat, field) == getattr(vertex, field), field
    assert dict(flat.trainer_flags) == dict(vertex.trainer_flags) == {
        "eval_frequency": "50", "log_frequency": "50"}
    # Vertex has no successive halving: its sample keeps Vertex's median rule.
    assert flat.early_stopping == {"type": "successive_halving", "min_resource": 50, "reduction_factor": 3}
    assert vertex.early_stopping["type"] == "median"
    study.check_against_trainer(flat)  # every sample parameter is a real trainer flag


def test_sample_defaults_are_the_quickstart_configuration():
    flat = spec_lib.load(os.path.join(SAMPLES, "digits.yaml"))
    assert params_lib.defaults(flat.parameters) == {
        "optimizer_type": "momentum", "initial_learning_rate": 0.1, "label_smoothing": 0.1, "warmup_steps": 50}


def test_conditional_parameters_follow_their_parent():
    flat = spec_lib.load(os.path.join(SAMPLES, "digits.yaml"))
    seen = {}
    for _ in range(20):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler()).ask()
        chosen = params_lib.suggest(trial, flat.parameters)
        seen.setdefault(chosen["optimizer_type"], []).append(chosen["initial_learning_rate"])
    assert all(0.01 <= lr <= 0.8 for lr in seen["momentum"])
    assert all(0.0003 <= lr <= 0.03 for lr in seen["adam"])


def _under(parent, parent_values, child):
    return {**parent, "conditional": [{"parent_values": parent_values, "parameters": child}]}


LR = {"initial_learning_rate": {"type": "double", "min": 0.01, "max": 1, "scale": "log"}}
OPTIMIZERS = {"type": "categorical", "values": ["momentum", "adam"]}


@pytest.mark.parametrize("param, fragments", [
    # A parent value the parameter never takes would leave the child silently untuned.
    (_under(OPTIMIZERS, ["momentun"], LR), ["parameters.x", "'momentun'", "never takes", "momentum"]),
    (_under({"type": "integer", "min": 0, "max": 3}, [7], LR), ["value 7", "[0, 3]"]),
    (_under({"type": "double", "min": 0, "max": 1}, [0.5], LR), ["need a categorical, discrete or integer parent"]),
    # One name, two kinds of distribution: Optuna cannot hold both in one study.
    ({**OPTIMIZERS, "conditional": [
        {"parent_values": ["momentum"], "parameters": {"train_batch_size": {"type": "discrete", "values": [32, 64]}}},
        {"parent_values": ["adam"], "parameters": {"train_batch_size": {"type": "discrete", "values": [16, 32]}}}]},
     ["parameter train_batch_size: appears twice"]),
])
def test_bad_conditions_are_refused(tmp_path, param, fragments):
    with pytest.raises(UserError) as e:
        load_dict(tmp_path, minimal(parameters={"x": param}))
    for fragment in fragments:
        assert fragment in str(e.value)


def test_vertex_integer_parent_values_written_as_strings_switch_their_children_on(tmp_path):
    # Vertex's REST form writes int64 values as strings: "1" must match the integer 1.
    child = {"parameterId": "initial_learning_rate", "doubleValueSpec": {"minValue": 0.01, "maxValue": 0.1}}
    parent = {"parameterId": "warmup_steps", "integerValueSpec": {"minValue": "1", "maxValue": "1"},
              "conditionalParameterSpecs": [{"parentIntValues": {"values": ["1"]}, "parameterSpec": child}]}
    config = {"maxTrialCount": 2, "studySpec": {"metrics": [{"metricId": "top_1_accuracy", "goal": "MAXIMIZE"}],
                                                "parameters": [parent]}}
    spec = load_dict(tmp_path, config)
    chosen = params_lib.suggest(optuna.create_study().ask(), spec.parameters)
    assert chosen["warmup_steps"] == 1 and 0.01 <= chosen["initial_learning_rate"] <= 0.1


@pytest.mark.parametrize("text, fragments", [
    ("parameters: [unclosed", ["not valid YAML", "line 1"]),
    ("- just\n- a list\n", ["expected a mapping"]),
])
def test_malformed_yaml(tmp_path, text, fragments):
    with pytest.raises(UserError) as e:
        load_text(tmp_path, text)
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize("param, fragments", [
    ({"type": "float", "min": 0, "max": 1}, ["parameters.x.type", "'float'", "double, integer, categorical"]),
    ({"type": "double", "min": 0.5, "max": 0.1}, ["parameters.x", "min 0.5 is greater than max 0.1"]),
    ({"type": "double", "min": 0.0, "max": 0.1, "scale": "log"}, ["log scale needs min > 0"]),
    ({"type": "integer", "min": 1, "max": 2.5}, ["parameters.x.max", "integer"]),
    ({"type": "double", "min": 0, "max": 1, "maxx": 2}, ["parameters.x.maxx: unknown key", "max"]),
    ({"type": "categorical", "values": []}, ["non-empty list values"]),
    ({"type": "double", "min": 0, "max": 1, "scale": "logarithmic"}, ["parameters.x.scale", "linear, log"]),
])
def test_bad_flat_parameter(tmp_path, param, fragments):
    with pytest.raises(UserError) as e:
        load_dict(tmp_path, minimal(parameters={"x": param}))
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize("stopping, fragments", [
    ({"typo": 1}, ["studySpec.medianAutomatedStoppingSpec.typo: unknown key", "useElapsedDuration"]),
    ({"useElapsedDuration": True}, ["useElapsedDuration: not supported", "equal training steps"]),
])
def test_vertex_stopping_settings_are_checked(tmp_path, stopping, fragments):
    config = {"maxTrialCount": 2, "studySpec": {
        "metrics": [{"metricId": "top_1_accuracy", "goal": "MAXIMIZE"}], "medianAutomatedStoppingSpec": stopping,
        "parameters": [{"parameterId": "x", "doubleValueSpec": {"minValue": 0.1, "maxValue": 1}}]}}
    with pytest.raises(UserError) as e:
        load_dict(tmp_path, config)
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize("job, fragments", [
    ({"workerPoolSpecs": [{"containerSpec": {"comand": ["python", "t.py"]}}]},
     ["trialJobSpec.workerPoolSpecs[0].containerSpec.comand: unknown key", "command"]),
    ({"workerPoolSpecs": [{"containerSpec": {"env": [{"value": "1"}]}}]}, ["containerSpec.env[0]: expected {name"]),
])
def test_bad_trial_job_spec(tmp_path, job, fragments):
    config = {"maxTrialCount": 2, "trialJobSpec": job, "studySpec": {
        "metrics": [{"metricId": "top_1_accuracy"}], "parameters": [{"parameterId": "x", "doubleValueSpec": {}}]}}
    with pytest.raises(UserError) as e:
        load_dict(tmp_path, config)
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize("param, fragments", [
    ({"parameterId": "x", "floatValueSpec": {"minValue": 0, "maxValue": 1}},
     ["studySpec.parameters[0].floatValueSpec: unknown key", "doubleValueSpec"]),
    ({"parameterId": "x", "doubleValueSpec": {"minValue": 2, "maxValue": 1}},
     ["studySpec.parameters[0].doubleValueSpec", "minValue 2.0 is greater than maxValue 1.0"]),
    ({"parameterId": "x", "doubleValueSpec": {"minValue": -1, "maxValue": 1}, "scaleType": "UNIT_LOG_SCALE"},
     ["log scale needs minValue > 0"]),
    ({"parameterId": "x", "doubleValueSpec": {"minValue": 0, "maxValue": 1}, "scaleType": "UNIT_REVERSE_LOG_SCALE"},
     ["scaleType", "UNIT_LOG_SCALE"]),
])
def test_bad_vertex_parameter(tmp_path, param, fragments):
    config = {"maxTrialCount": 2, "studySpec": {"metrics": [{"metricId": "top_1_accuracy", "goal": "MAXIMIZE"}],
                                                "parameters": [param]}}
    with pytest.raises(UserError) as e:
        load_dict(tmp_path, config)
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize("overrides, fragments", [
    ({"max_trials": 3}, ["max_trials: unknown key", "max_trial_count"]),
    ({"sampler": "bayesian"}, ["sampler", "tpe, random, grid, cmaes, gp"]),
    ({"early_stopping": "asha"}, ["early_stopping", "median, hyperband"]),
    ({"goal": "biggest"}, ["goal", "maximize, minimize"]),
    ({"max_trial_count": 0}, ["max_trial_count", ">= 1"]),
    ({"flagfile": "no/such.flags"}, ["flagfile: no/such.flags does not exist"]),
])
def test_bad_study_setting(tmp_path, overrides, fragments):
    with pytest.raises(UserError) as e:
        load_dict(tmp_path, minimal(**overrides))
    for fragment in fragments:
        assert fragment in str(e.value)


@pytest.mark.parametrize("overrides, fragments", [
    ({"parameters": {"learning_rate": {"type": "double", "min": 0.1, "max": 1}}},
     ["parameter learning_rate: not a trainer flag"]),
    ({"parameters": {"max_steps": {"type": "double", "min": 1, "max": 9}}},
     ["parameter max_steps", "double range for a int flag", "use integer"]),
    ({"trainer_flags": {"num_clases": 10}}, ["trainer_flags.num_clases: not a trainer flag"]),
    ({"trainer_flags": {"job-dir": "/tmp/x"}}, ["trainer_flags.job-dir", "driver sets it"]),
])
def test_parameters_and_fixed_flags_must_be_trainer_flags(tmp_path, overrides, fragments):
    spec = load_dict(tmp_path, minimal(**overrides))
    with pytest.raises(UserError) as e:
        study.check_against_trainer(spec)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_a_parameter_must_be_a_tunable_flag_of_the_builtin_trainer(tmp_path):
    fixed_only = minimal(parameters={"eval_frequency": {"type": "integer", "min": 10, "max": 50}})
    with pytest.raises(UserError) as e:
        study.check_against_trainer(load_dict(tmp_path, fixed_only))
    assert "parameter eval_frequency" in str(e.value) and "under trainer_flags instead" in str(e.value)
    assert "initial_learning_rate" in str(e.value)  # the tunable flags are listed
    # As a fixed flag it is fine.
    study.check_against_trainer(load_dict(tmp_path, minimal(trainer_flags={"eval_frequency": 10})))


def test_another_trainer_takes_any_parameter_and_flag_names(tmp_path):
    custom = {"trainer_command": "python my_trainer.py", "metric": "loss", "goal": "minimize",
              "trainer_flags": {"data_dir": "/data", "eval_frequency": 10},
              "parameters": {"dropout": {"type": "double", "min": 0, "max": 0.5},
                             "max_steps": {"type": "categorical", "values": ["short", "long"]}}}
    study.check_against_trainer(load_dict(tmp_path, minimal(**custom)))
    with pytest.raises(UserError, match="trainer_flags.job-dir: the study driver sets it"):
        study.check_against_trainer(load_dict(tmp_path, minimal(**{**custom, "trainer_flags": {"job-dir": "/x"}})))


@pytest.mark.parametrize("value, text", [
    (True, "true"), (False, "false"), (np.True_, "true"),
    (0.1, "0.1"), (np.float64(0.1), "0.1"), (np.float32(0.1), "0.1"), (1e-05, "1e-05"),
    (32, "32"), (np.int64(32), "32"), ("adam", "adam"),
])
def test_values_reach_the_trainer_command_line_as_plain_text(value, text):
    assert params_lib.flag_text(value) == text


def test_trial_command_line_orders_flagfile_fixed_flags_then_parameters(tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--max_steps=5\n")
    spec = load_dict(tmp_path, minimal(flagfile=str(flagfile), trainer_flags={"max_steps": 9, "random_flip": False}))
    argv = runner.trainer_argv(spec, "/jobs/trial-0003", {"initial_learning_rate": np.float64(0.05),
                                                           "train_batch_size": np.int64(64)})
    assert argv[1:] == ["-m", "trainer.task", f"--flagfile={flagfile}", "--hyperparameter_metric_tag=top_1_accuracy",
                        "--scan_cache_dir=/jobs/scan-cache", "--max_steps=9", "--random_flip=false",
                        "--initial_learning_rate=0.05", "--train_batch_size=64", "--job-dir=/jobs/trial-0003"]


def test_grid_needs_finite_choices_and_sizes_the_study(tmp_path):
    grid = minimal(sampler="grid", parameters={"optimizer_type": {"type": "categorical", "values": ["adam", "momentum"]},
                                               "warmup_steps": {"type": "integer", "min": 0, "max": 2}})
    del grid["max_trial_count"]
    assert load_dict(tmp_path, grid).max_trial_count == 6
    with pytest.raises(UserError, match="grid search needs finite choices"):
        load_dict(tmp_path, minimal(sampler="grid"))


def test_bad_sampler_and_pruner_settings_name_the_setting(tmp_path):
    from hptuning import algorithms

    spec = load_dict(tmp_path, minimal(sampler={"type": "tpe", "n_startup": 3}, early_stopping={"type": "median"}))
    with pytest.raises(UserError, match=r"sampler.n_startup: not a setting of tpe; valid: seed, n_startup_trials"):
        algorithms.make_sampler(spec.sampler, spec.parameters)
    with pytest.raises(UserError, match=r"early_stopping: median: .*n_warmup_steps"):
        algorithms.make_pruner({"type": "median", "n_warmup_steps": -1})
