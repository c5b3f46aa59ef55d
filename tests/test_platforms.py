"""Other platforms' command lines run unchanged: Huawei ModelArts' parameter names and Alibaba PAI
EasyVision's param_config string are translated into the trainer's flags, the translation printed;
absl's `--flag value` and `--flag False` forms read as `--flag=value` in every entry point.

The translation tests need no data; the two training tests run the translated command for two steps
on tiny images (trainer_main: in this process).
"""

import os
import textwrap

import pytest

from tests.conftest import assert_user_error, write_folder, write_tfrecords
from trainer import cli, platforms

MODELARTS_STRATEGY = "5:0.1->0.4,10:0.4=>0.8,15:0.8~>0.001,20:0.001"


@pytest.fixture
def data_url(tmp_path):
    """A ModelArts input folder with train/ and eval/ subfolders (no images needed to translate)."""
    for sub in ("train", "eval"):
        os.makedirs(tmp_path / "data" / sub)
    return str(tmp_path / "data")


def test_a_modelarts_job_is_translated_name_by_name(data_url, tmp_path):
    out = str(tmp_path / "out")
    argv, lines = platforms.translate([
        "trainer.task", f"--data_url={data_url}", f"--train_url={out}", "--num_classes=5", "--use_mixup=True",
        "--mixup_alpha=0.3", "--label_balance=True", f"--learning_rate_strategy={MODELARTS_STRATEGY}",
        "--ohem_top_ratio=0.7", "--max_training_time=2", "--max_to_keep=3", "--use_sync_bn=True", "--batch_size=16",
        "--rescale_train_batch_size_factor=2", "--optimizer=momentum", "--momentum=0.95", "--do_eval_along_train=False"])
    assert lines == [
        f"ModelArts data_url={data_url} -> --training_data_path={data_url}/train --validation_data_path={data_url}/eval",
        f"ModelArts train_url={out} -> --job-dir={out} (a rerun resumes from it)",
        "ModelArts batch_size=16 rescale_train_batch_size_factor=2 -> --train_batch_size=32",
        "ModelArts use_mixup=True -> --mixup_alpha=0.3",
        "ModelArts label_balance=True -> --class_balancing=sampler",
        "ModelArts use_sync_bn=True -> --sync_batch_norm=true",
        "ModelArts optimizer=momentum momentum=0.95 -> --optimizer_type=momentum --optimizer_arguments=momentum=0.95",
        f"ModelArts learning_rate_strategy={MODELARTS_STRATEGY} -> --learning_rate_decay_type=strategy "
        f"--learning_rate_strategy={MODELARTS_STRATEGY} --num_epochs=20 (to its last END)",
        "ModelArts do_eval_along_train=False -> --eval_frequency=20e (one evaluation, at the last step)",
        f"translated: python -m trainer.task --training_data_path={data_url}/train "
        f"--validation_data_path={data_url}/eval --job-dir={out} --train_batch_size=32 --mixup_alpha=0.3 "
        "--class_balancing=sampler --sync_batch_norm=true --optimizer_type=momentum "
        f"--optimizer_arguments=momentum=0.95 '--learning_rate_strategy={MODELARTS_STRATEGY}' "
        "--learning_rate_decay_type=strategy --num_epochs=20 --eval_frequency=20e --num_classes=5 "
        "--ohem_top_ratio=0.7 --max_training_time=2 --max_to_keep=3",
    ]
    assert argv[0] == "trainer.task" and "--max_training_time=2" in argv  # hours, as ModelArts means it


def test_modelarts_switches_off_and_its_ignored_names_say_why(data_url):
    _, lines = platforms.translate([
        "trainer.task", "--data_url", data_url, "--use_mixup", "False", "--mixup_alpha=0.3", "--use_cutmix=True",
        "--label_balance=false", "--allow_growth=True", "--session_timeout=300", "--gpu_memory_fraction=0.9",
        "--num_readers=8", "--learning_rate_strategy=0.002", "--model_name=resnet_v1_50",
        "--checkpoint_url=/runs/old/checkpoints/best-400.weights.h5", "--max_steps", "100"])
    assert lines[1:] == [
        "ModelArts checkpoint_url=/runs/old/checkpoints/best-400.weights.h5 -> --pretrained_checkpoint_path="
        "/runs/old/checkpoints/best-400.weights.h5 (incremental training: the head is left out when --num_classes differs)",
        "ModelArts model_name=resnet_v1_50 -> --model_type=resnet-50",
        "ModelArts use_mixup=False -> off (--mixup_alpha=0.3 unused)",
        "ModelArts use_cutmix=True -> --cutmix_alpha=1.0",
        "ModelArts label_balance=false -> off (the default)",
        "ModelArts learning_rate_strategy=0.002 -> --learning_rate_decay_type=strategy --learning_rate_strategy=1:0.002 "
        "(a constant rate)",
        "ModelArts allow_growth=True: ignored, GPU memory is the backend's to manage",
        "ModelArts gpu_memory_fraction=0.9: ignored, GPU memory is the backend's to manage",
        "ModelArts session_timeout=300: ignored, no TensorFlow 1 session runs here",
        "ModelArts num_readers=8: ignored, tf.data sets its own read parallelism",
        f"translated: python -m trainer.task --training_data_path={data_url}/train --validation_data_path="
        f"{data_url}/eval --pretrained_checkpoint_path=/runs/old/checkpoints/best-400.weights.h5 --model_type=resnet-50 "
        "--cutmix_alpha=1.0 --learning_rate_strategy=1:0.002 --learning_rate_decay_type=strategy --max_steps=100",
    ]


PAI_MULTI_LABEL = """
                 --model_type MultiLabelClassification
                 --backbone  resnet_v1_50
                 --num_classes 10
                 --num_epochs 1
                 --model_dir oss://bucket/test/multilabel_resnet50
                 --use_pretrained_model true
                 --train_data oss://bucket/data/train/*.tfrecord
                 --test_data oss://bucket/data/test/*.tfrecord
                 --num_test_example 20
                 --train_batch_size 32
                 --test_batch_size=32
                 --image_size 224
                 --lr_type exponential_decay
                 --initial_learning_rate 0.01
                 --decay_epochs 20
                 --decay_factor 0.5
                 --optimizer adam
                 --staircase true   """


def test_a_pai_param_config_spanning_lines_is_translated_parameter_by_parameter():
    # The layout of PAI's documented multi-label command, its backbone and schedule ones this trainer has.
    argv, lines = platforms.translate(["trainer.task", "--pai_param_config", PAI_MULTI_LABEL])
    assert lines == [
        "PAI model_type=MultiLabelClassification -> --task=multi_label",
        "PAI backbone=resnet_v1_50 -> --model_type=resnet-50",
        "PAI num_classes=10 -> --num_classes=10",
        "PAI num_epochs=1 -> --num_epochs=1",
        "PAI model_dir=oss://bucket/test/multilabel_resnet50 -> --job-dir=oss://bucket/test/multilabel_resnet50",
        "PAI train_data=oss://bucket/data/train/*.tfrecord -> --training_data_path=oss://bucket/data/train/*.tfrecord",
        "PAI test_data=oss://bucket/data/test/*.tfrecord -> --validation_data_path=oss://bucket/data/test/*.tfrecord",
        "PAI num_test_example=20 -> --num_eval_images=20",
        "PAI train_batch_size=32 -> --train_batch_size=32",
        "PAI test_batch_size=32 -> --eval_batch_size=32",
        "PAI image_size=224 -> --image_size=224",
        "PAI lr_type=exponential_decay -> --learning_rate_decay_type=exponential",
        "PAI initial_learning_rate=0.01 -> --initial_learning_rate=0.01",
        "PAI decay_epochs=20 -> --decay_epochs=20",
        "PAI decay_factor=0.5 -> --decay_factor=0.5",
        "PAI staircase=true -> --staircase=true",
        "PAI optimizer=adam -> --optimizer_type=adam",
        "PAI use_pretrained_model=true -> random initial weights: Keras has no ImageNet weights for resnet-50 "
        "(--pretrained_checkpoint_path may name a weights file of an earlier run)",
        "translated: python -m trainer.task --task=multi_label --model_type=resnet-50 --num_classes=10 --num_epochs=1 "
        "--job-dir=oss://bucket/test/multilabel_resnet50 '--training_data_path=oss://bucket/data/train/*.tfrecord' "
        "'--validation_data_path=oss://bucket/data/test/*.tfrecord' --num_eval_images=20 --train_batch_size=32 "
        "--eval_batch_size=32 --image_size=224 --learning_rate_decay_type=exponential --initial_learning_rate=0.01 "
        "--decay_epochs=20 --decay_factor=0.5 --staircase=true --optimizer_type=adam",
    ]
    # The = form is the same string, and PAI's pretrained weights become Keras's where Keras has them.
    same, _ = platforms.translate(["trainer.task", f"--pai_param_config={PAI_MULTI_LABEL}"])
    assert same == argv
    _, lines = platforms.translate(["t", "--pai_param_config=--backbone efficientnet_b0 --use_pretrained_model true"])
    assert lines[1] == "PAI use_pretrained_model=true -> --pretrained_checkpoint_path=imagenet"


PAI_DOCUMENTED = """
                 --model_type Classification
                 --backbone  inception_v4
                 --num_classes 10
                 --num_epochs 1
                 --model_dir oss://pai-vision-data-sh/test/cifar_inception_v4
                 --use_pretrained_model true
                 --train_data oss://pai-vision-data-sh/data/test/cifar10/*.tfrecord
                 --test_data oss://pai-vision-data-sh/data/test/cifar10/*.tfrecord
                 --num_test_example 20
                 --train_batch_size 32
                 --test_batch_size=32
                 --image_size 299
                 --initial_learning_rate 0.01
                 --staircase true   """


def test_a_pai_backbone_not_built_here_is_refused_with_the_ones_that_are(trainer_main):
    # PAI's own single-label example, verbatim: its inception_v4 is not a network this trainer builds.
    result = trainer_main(["--pai_param_config", PAI_DOCUMENTED])
    error = assert_user_error(result, "PAI backbone 'inception_v4' is not one this trainer builds; it builds ",
                              "resnet_v1_50 (resnet-50)", "resnet_v1a_18 (resnet-18)", "efficientnet_b7 (efficientnet-b7)")
    assert "resnet_v2" not in error and result.stdout == ""


@pytest.mark.parametrize("args, fragment", [
    (["--data_url=DATA"], "ModelArts data_url=DATA has no validation/ or eval/ subfolder, so it holds the training "
                          "images alone; name the validation images with --validation_data_path"),
    (["--data_url=DATA/train", "--training_data_path=x"], "ModelArts data_url and --training_data_path both set "
                                                          "--training_data_path; give one of them"),
    (["--train_url=out", "--job_dir=x"], "ModelArts train_url and --job_dir both set --job-dir"),
    (["--batch_size=16", "--rescale_train_batch_size_factor=0.3"], "the training batch would be 4.8 images"),
    (["--optimizer=lamb"], "ModelArts optimizer='lamb': this trainer has momentum, sgd, adam, rmsprop"),
    (["--use_mixup=maybe"], "ModelArts use_mixup='maybe': expected True or False"),
    (["--model_name=resnet_v2_101"], "ModelArts backbone 'resnet_v2_101' is not one this trainer builds"),
    (["--momentum=0.9", "--optimizer_arguments=momentum=0.8"], "momentum and --optimizer_arguments both set momentum"),
    (["--evaluate_every_n_epochs=2", "--do_eval_along_train=False"],
     "ModelArts do_eval_along_train and ModelArts evaluate_every_n_epochs both set --eval_frequency"),
    (["--pai_param_config=--model_type Detection"], "PAI model_type=Detection: this trainer trains "
                                                    "Classification, MultiLabelClassification, DataParallelMetricLearning"),
    (["--pai_param_config=--num_classes 3 --anchor_scales 1,2"], "PAI parameter --anchor_scales is not one this "
                                                                 "trainer translates; it translates backbone, "),
    (["--pai_param_config=--lr_type manual_step"], "PAI lr_type=manual_step: this trainer translates exponential_decay"),
    (["--pai_param_config=--num_classes"], "--pai_param_config: --num_classes has no value"),
    (["--pai_param_config=--model_dir a", "--job-dir=b"], "PAI model_dir=a and --job-dir both set --job-dir"),
    (["--pai_param_config= "], "--pai_param_config is empty"),
])
def test_what_cannot_be_translated_is_one_error_line(args, fragment, trainer_main, tmp_path, monkeypatch):
    os.makedirs(tmp_path / "DATA" / "train")
    monkeypatch.chdir(tmp_path)  # DATA is a relative path
    assert_user_error(trainer_main(args), fragment)


@pytest.mark.parametrize("args, line", [
    (["--optimizer", "SGD"], "ModelArts optimizer=SGD -> --optimizer_type=momentum --optimizer_arguments=momentum=0"),
    (["--momentum=0.8", "--optimizer_arguments=nesterov=true"],
     "ModelArts momentum=0.8 -> --optimizer_arguments=nesterov=true,momentum=0.8"),
    (["--pai_param_config=--optimizer momentum --momentum 0.8"],
     "PAI optimizer=momentum momentum=0.8 -> --optimizer_type=momentum --optimizer_arguments=momentum=0.8"),
])
def test_optimizer_and_momentum_become_the_optimizer_type_and_its_arguments(args, line):
    assert platforms.translate(["trainer.task", *args])[1][0] == line


def test_a_data_url_without_validation_split_trains_on_it_with_validation_data_path(tmp_path):
    os.makedirs(tmp_path / "images" / "cat")
    _, lines = platforms.translate(["t", f"--data_url={tmp_path}/images", "--validation_data_path=val"])
    assert lines[0] == f"ModelArts data_url={tmp_path}/images -> --training_data_path={tmp_path}/images"


def test_a_command_line_without_platform_names_is_left_as_it_is():
    argv = ["trainer.task", "--training_data_path", "t", "--random_flip", "False", "extra"]
    assert platforms.translate(argv) == (argv, [])


def test_every_platform_backbone_is_a_backbone_built_here():
    from trainer.backbones import BACKBONES

    assert set(platforms.PLATFORM_BACKBONES.values()) <= set(BACKBONES)


# --flag value and --flag False, in every entry point (cli.parse_command_line).

def test_trainer_flags_read_the_same_with_a_space_and_booleans_take_a_following_word():
    from trainer import task

    cli.parse_command_line(task.FLAGS, ["task", "--training_data_path", "t", "--num_classes", "3", "--random_flip",
                                        "False", "--staircase", "1", "--eval_each_category", "TRUE",
                                        "--warmup_learning_rate", "-0.5", "--job-dir", "out"])
    assert (task.FLAGS.training_data_path, task.FLAGS.num_classes, task.FLAGS.random_flip) == ("t", 3, False)
    assert task.FLAGS.staircase and task.FLAGS.eval_each_category and task.FLAGS.warmup_learning_rate == -0.5
    assert task.FLAGS["job-dir"].value == "out"
    task.FLAGS.unparse_flags()


def test_other_entry_points_read_the_space_forms_too():
    from hptuning import study
    from trainer.serving import predict

    cli.parse_command_line(predict.FLAGS, ["predict", "--model_dir", "m", "--input_path", "in.txt", "--output_path",
                                           "out.txt", "--overwrite", "true", "--merge", "False", "--batch_size", "4"])
    assert (predict.FLAGS.model_dir, predict.FLAGS.overwrite, predict.FLAGS.merge, predict.FLAGS.batch_size) == (
        "m", True, False, 4)
    predict.FLAGS.unparse_flags()
    cli.parse_command_line(study.FLAGS, ["study", "--study_config", "s.yaml", "--poll_seconds", "0.5"])
    assert (study.FLAGS.study_config, study.FLAGS.poll_seconds) == ("s.yaml", 0.5)
    study.FLAGS.unparse_flags()


@pytest.mark.parametrize("args, fragment", [
    (["extra"], "unexpected argument 'extra'"),
    (["--max_steps", "5", "--random_flip", "extra"], "unexpected argument 'extra'"),  # not a boolean word: not taken
    (["--training_data_path", "--num_classes=3"], "--training_data_path needs a value before --num_classes=3"),
    (["--max_steps", "ten"], "--max_steps"),
])
def test_a_stray_word_or_a_missing_value_is_still_an_error(args, fragment, trainer_main):
    assert_user_error(trainer_main(args), fragment)


# The translated commands train.

TINY = ["--image_size=16", "--max_steps=2", "--log_frequency=1", "--eval_batch_size=8"]


def test_a_modelarts_command_line_trains(tmp_path, trainer_main):
    write_folder(tmp_path / "data" / "train", per_class=8)
    write_folder(tmp_path / "data" / "eval", per_class=2, seed=1)
    out = tmp_path / "out"
    result = trainer_main([f"--data_url={tmp_path}/data", f"--train_url={out}", "--num_classes=2",
                           "--model_name=resnet_v1_18", "--batch_size=8", "--label_balance=True",
                           "--do_eval_along_train=False", "--allow_growth=True", *TINY])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        f"ModelArts data_url={tmp_path}/data -> --training_data_path={tmp_path}/data/train "
        f"--validation_data_path={tmp_path}/data/eval",
        f"ModelArts train_url={out} -> --job-dir={out} (a rerun resumes from it)",
        "ModelArts model_name=resnet_v1_18 -> --model_type=resnet-18",
        "ModelArts batch_size=8 -> --train_batch_size=8",
        "ModelArts label_balance=True -> --class_balancing=sampler",
    ]
    assert lines[5:7] == ["ModelArts do_eval_along_train=False -> --eval_frequency=2 (one evaluation, at the last step)",
                          "ModelArts allow_growth=True: ignored, GPU memory is the backend's to manage"]
    assert lines[7].startswith("translated: python -m trainer.task ") and lines[-1].startswith("top_1_accuracy=")
    assert (out / "model" / "saved_model.pb").exists()


def test_a_pai_param_config_trains(tmp_path, trainer_main):
    train = write_tfrecords(tmp_path / "train", per_class=8)
    val = write_tfrecords(tmp_path / "val", per_class=2, seed=1, shards=1)
    config = textwrap.dedent(f"""
        --model_type Classification
        --backbone resnet_v1a_18
        --num_classes 2
        --model_dir {tmp_path}/out
        --train_data {train}
        --test_data {val}
        --train_batch_size 8
        --test_batch_size=8
        --image_size 16
        --lr_type exponential_decay
        --initial_learning_rate 0.01
        --decay_epochs 1
        --staircase true""")
    result = trainer_main(["--pai_param_config", config, "--max_steps", "2", "--log_frequency", "1"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["PAI model_type=Classification -> --task=classification",
                         "PAI backbone=resnet_v1a_18 -> --model_type=resnet-18"]
    assert lines[13] == ("translated: python -m trainer.task --task=classification --model_type=resnet-18 --num_classes=2 "
                         f"--job-dir={tmp_path}/out '--training_data_path={train}' '--validation_data_path={val}' "
                         "--train_batch_size=8 --eval_batch_size=8 --image_size=16 --learning_rate_decay_type=exponential "
                         "--initial_learning_rate=0.01 --decay_epochs=1 --staircase=true --max_steps=2 --log_frequency=1")
    assert lines[-1].startswith("top_1_accuracy=") and (tmp_path / "out" / "model" / "saved_model.pb").exists()


def test_pai_metric_learning_names_become_the_task_its_backbones_and_the_split_head():
    config = ("--model_type ModelParallelMetricLearning --backbone swint_tiny --optimizer adamw --num_classes 1000 "
              "--train_data oss://b/train_labeled.txt --test_data oss://b/val_labeled.txt --model_dir oss://b/run")
    _, lines = platforms.translate(["t", "--pai_param_config", config])
    assert lines[:3] == [
        "PAI model_type=ModelParallelMetricLearning -> --task=metric_learning --classifier_parallelism=model "
        "--backend=jax",
        "PAI backbone=swint_tiny -> --model_type=swin-tiny",
        "PAI num_classes=1000 -> --num_classes=1000",
    ]
    assert "PAI optimizer=adamw -> --optimizer_type=adamw" in lines
    _, lines = platforms.translate(["t", "--pai_param_config=--model_type DataParallelMetricLearning --backbone vit_base"])
    assert lines[:2] == ["PAI model_type=DataParallelMetricLearning -> --task=metric_learning",
                         "PAI backbone=vit_base -> --model_type=vit-base"]


def test_a_pai_xcit_backbone_is_refused_with_the_reason(trainer_main):
    result = trainer_main(["--pai_param_config=--model_type DataParallelMetricLearning --backbone xcit_small"])
    assert_user_error(result, "PAI backbone 'xcit_small': XCiT has no maintained Keras implementation", "swint_tiny")
