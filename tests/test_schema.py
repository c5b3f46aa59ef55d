"""The one flag table: absl flags, Config, the fingerprint and the study's flag types all come from it."""

import re
import dataclasses

import pytest

from trainer import config, schema, task
from trainer.backbones import BACKBONES
from trainer.cli import UserError

REQUIRED = dict(training_data_path="t", validation_data_path="v", num_classes=3, max_steps=10)


def test_every_config_field_is_a_flag_with_the_tables_default():
    fields = {f.name: f for f in dataclasses.fields(config.Config)}
    assert set(fields) == {flag.name for flag in schema.config_flags()}
    for flag in schema.config_flags():
        assert flag.name in task.FLAGS  # an absl flag
        if not flag.required:
            assert fields[flag.name].default == config.parse_value(flag, flag.default), flag.name


def test_model_type_choices_are_the_backbone_table():
    assert schema.BY_NAME["model_type"].choices == tuple(BACKBONES)
    with pytest.raises(UserError, match=r"--model_type must be one of resnet-18\|34\|50\|101\|152\|200, efficientnet-b0..b7, vit-tiny"):
        config.from_values({**REQUIRED, "model_type": "vgg-16"})


def test_structured_flags_are_parsed_from_their_text():
    c = config.from_values({**REQUIRED, "learning_rate_decay_type": "stepwise", "stepwise_learning_rate_steps": "3,6",
                            "stepwise_learning_rate_levels": "0.1, 0.01", "optimizer_arguments": "momentum=0,nesterov=true"})
    assert c.stepwise_learning_rate_steps == (3, 6) and c.stepwise_learning_rate_levels == (0.1, 0.01)
    assert c.optimizer_arguments == (("momentum", 0.0), ("nesterov", True))
    assert c.num_classes == 3 and c.metric == "top_1_accuracy"


@pytest.mark.parametrize("values, fragment", [
    ({}, "--training_data_path, --validation_data_path, --num_classes, --max_steps (or --num_epochs) are required"),
    ({**REQUIRED, "stepwise_learning_rate_steps": "1,x"}, "--stepwise_learning_rate_steps='1,x': expected comma-separated integers"),
    ({**REQUIRED, "weight_decay": float("inf")}, "--weight_decay must be a finite number"),
    ({**REQUIRED, "task": "multi_label", "hyperparameter_metric_tag": "top_1_accuracy"}, "must be one of mAP"),
    ({**REQUIRED, "hyperparameter_metric_tag": "top_5_accuracy"}, "top_5_accuracy needs more than 5 classes"),
])
def test_config_refuses_what_cannot_work(values, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        config.from_values(values)


def test_the_fingerprint_is_the_flags_marked_in_the_table():
    assert set(schema.fingerprint_fields()) == {
        "model_type", "num_classes", "image_size", "task", "optimizer_type", "optimizer_arguments",
        "train_batch_size", "seed", "training_data_path", "class_balancing", "ema_decay", "embedding_size",
        "metric_loss", "classifier_parallelism"}


def test_the_study_driver_sees_every_flag_with_its_absl_type():
    types = schema.flag_types()
    assert types["initial_learning_rate"] == "float" and types["train_batch_size"] == "int"
    assert types["random_flip"] == "bool" and types["stepwise_learning_rate_steps"] == "string"
    assert "job-dir" not in types and set(schema.tunable()) <= set(types)
    assert "training_data_path" not in schema.tunable()


def test_backend_comes_from_the_environment_when_the_flag_is_absent():
    task.FLAGS.unparse_flags()
    task.FLAGS(["task", *(f"--{k}={v}" for k, v in REQUIRED.items())])
    assert task.config_from_flags(task.FLAGS, {"KERAS_BACKEND": "jax"}).backend == "jax"
    assert task.config_from_flags(task.FLAGS, {}).backend == "tensorflow"
    task.FLAGS.unparse_flags()
    task.FLAGS(["task", *(f"--{k}={v}" for k, v in REQUIRED.items()), "--backend=tensorflow"])
    assert task.config_from_flags(task.FLAGS, {"KERAS_BACKEND": "jax"}).backend == "tensorflow"
    task.FLAGS.unparse_flags()
