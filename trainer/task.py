"""Entry point: `python -m trainer.task --flag=value ...` (also the container's).

The only module that defines flags. It turns them into a validated Config,
picks the Keras backend before Keras is imported, and hands over to
train.run(). User mistakes end here as one `error:` line and exit status 2.
"""

import os
import sys

from absl import flags

from trainer import config as config_lib

FLAGS = flags.FlagValues()

# Flag names, defaults and meanings follow Google's built-in image
# classification algorithm where it has the flag.
flags.DEFINE_string("training_data_path", None, "TFRecord glob, folder with one subfolder per class, or image-list .txt file (local or gs://).", flag_values=FLAGS)
flags.DEFINE_string("validation_data_path", None, "Same forms as --training_data_path; evaluated every --eval_frequency steps.", flag_values=FLAGS)
flags.DEFINE_string("job-dir", None, "Output folder (model/, checkpoints/, logs/, config.json, metrics.json, labels.txt).", flag_values=FLAGS)
flags.DEFINE_string("job_dir", None, "Same as --job-dir.", flag_values=FLAGS)
flags.DEFINE_integer("num_classes", None, "Number of classes; labels must lie in [0, num_classes) after --label_offset.", flag_values=FLAGS)
flags.DEFINE_integer("max_steps", None, "Training steps (batches). Required.", flag_values=FLAGS)
flags.DEFINE_integer("train_batch_size", 32, "Images per training step.", flag_values=FLAGS)
flags.DEFINE_integer("eval_batch_size", 32, "Images per evaluation batch.", flag_values=FLAGS)
flags.DEFINE_integer("num_eval_images", 0, "Validation images per evaluation; 0 = all.", flag_values=FLAGS)
flags.DEFINE_integer("eval_frequency", 1000, "Steps between evaluations; one always runs at max_steps.", flag_values=FLAGS)
flags.DEFINE_string("pretrained_checkpoint_path", "", "Weights (.weights.h5 or .keras, local or gs://) of the same model_type, the head skipped when num_classes differs; or 'imagenet' (efficientnet-*: Keras downloads them).", flag_values=FLAGS)
flags.DEFINE_string("learning_rate_decay_type", "cosine", "cosine | stepwise.", flag_values=FLAGS)
flags.DEFINE_float("initial_learning_rate", 0.0001, "Learning rate after warmup (cosine starts its decay from it).", flag_values=FLAGS)
flags.DEFINE_float("warmup_learning_rate", 0.0, "Learning rate at step 0; rises linearly to initial_learning_rate over warmup_steps.", flag_values=FLAGS)
flags.DEFINE_integer("warmup_steps", 0, "Steps of linear warmup.", flag_values=FLAGS)
flags.DEFINE_string("stepwise_learning_rate_steps", "100,200", "Stepwise decay: steps at which the learning rate changes.", flag_values=FLAGS)
flags.DEFINE_string("stepwise_learning_rate_levels", "0.008,0.0008", "Stepwise decay: the learning rate from each of those steps on.", flag_values=FLAGS)
flags.DEFINE_string("optimizer_type", "momentum", "momentum | adam | rmsprop.", flag_values=FLAGS)
flags.DEFINE_string("optimizer_arguments", "", "name=value pairs for the optimizer, e.g. 'momentum=0.9,nesterov=true'.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "Side in pixels of the square image the network sees.", flag_values=FLAGS)
flags.DEFINE_string("model_type", "efficientnet-b0", f"One of: {', '.join(config_lib.MODEL_TYPES)}.", flag_values=FLAGS)
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing in [0, 1).", flag_values=FLAGS)
flags.DEFINE_float("weight_decay", 0.0001, "loss = cross_entropy + weight_decay * sum(w**2)/2 over conv and dense kernels.", flag_values=FLAGS)
flags.DEFINE_boolean("random_flip", True, "Flip training images left-right at random (turn off for text or digits).", flag_values=FLAGS)
flags.DEFINE_float("random_crop_min_area", 0.08, "Smallest fraction of an image a random training crop keeps.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 42, "Seed for initialisation, shuffling and augmentation.", flag_values=FLAGS)
flags.DEFINE_string("backend", None, "tensorflow | jax (default: $KERAS_BACKEND, else tensorflow).", flag_values=FLAGS)
flags.DEFINE_string("precision", "float32", "float32 | mixed_bfloat16 | mixed_float16.", flag_values=FLAGS)
flags.DEFINE_string("image_key", "image/encoded", "TFRecord feature holding the encoded image.", flag_values=FLAGS)
flags.DEFINE_string("label_key", "image/class/label", "TFRecord feature holding the integer label.", flag_values=FLAGS)
flags.DEFINE_integer("label_offset", 0, "Subtracted from every label (1 for Google's 1-based converters).", flag_values=FLAGS)
flags.DEFINE_string("label_map_path", "", "Text file with one class name per line, in label order.", flag_values=FLAGS)
flags.DEFINE_float("max_corrupt_fraction", 0.01, "Stop with an error when more than this fraction of images cannot be decoded.", flag_values=FLAGS)
flags.DEFINE_integer("log_frequency", 100, "Steps between progress lines.", flag_values=FLAGS)
flags.DEFINE_string("task", "classification", "classification (one label per image) | multi_label (any number: sigmoid head).", flag_values=FLAGS)
flags.DEFINE_string("multi_label_threshold", "0.5", "multi_label: a probability, or 'auto' for per-class thresholds that maximise F1 on validation; stored in the export.", flag_values=FLAGS)
flags.DEFINE_boolean("eval_each_category", False, "Also report every class's AP, precision, recall and F1 (multi_label) in metrics.json and TensorBoard.", flag_values=FLAGS)
flags.DEFINE_string("hyperparameter_metric_tag", "", "Metric that picks the best evaluation and is reported for tuning; default top_1_accuracy, or mAP for multi_label.", flag_values=FLAGS)

_LIST_FLAGS = {
    "stepwise_learning_rate_steps": config_lib.parse_int_list,
    "stepwise_learning_rate_levels": config_lib.parse_float_list,
}


def flag_names():
    """Every flag the trainer accepts (the study driver checks parameters against it)."""
    return sorted(name for name in FLAGS if name not in ("flagfile", "undefok", "job-dir"))


def config_from_flags(values):
    """Builds and validates the Config from parsed flag values."""
    fields = {f.name for f in config_lib.dataclasses.fields(config_lib.Config)}
    kwargs = {name: values[name].value for name in fields if name in values and values[name].value is not None}
    for name, parse in _LIST_FLAGS.items():
        kwargs[name] = parse(name, values[name].value)
    kwargs["optimizer_arguments"] = config_lib.parse_optimizer_arguments(values["optimizer_arguments"].value)
    kwargs["backend"] = values["backend"].value or os.environ.get("KERAS_BACKEND", "tensorflow")
    for required in ("training_data_path", "validation_data_path", "num_classes", "max_steps"):
        if values[required].value is None:
            raise config_lib.UserError(f"--{required} is required")
    config = config_lib.Config(**kwargs)
    config_lib.validate(config)
    return config


def job_dir_from_flags(values):
    dashed, underscored = values["job-dir"].value, values["job_dir"].value
    if dashed and underscored and dashed != underscored:
        raise config_lib.UserError("--job-dir and --job_dir disagree; give one of them")
    job_dir = dashed or underscored
    if not job_dir and os.environ.get("AIP_MODEL_DIR"):
        job_dir = os.path.dirname(os.environ["AIP_MODEL_DIR"].rstrip("/"))
    if not job_dir:
        raise config_lib.UserError("--job-dir is required (an output folder, local or gs://)")
    return job_dir


def main(argv=None):
    config_lib.parse_command_line(FLAGS, argv)
    try:
        config = config_from_flags(FLAGS)
        job_dir = job_dir_from_flags(FLAGS)
    except config_lib.UserError as e:
        config_lib.fail(str(e))
    # Keras reads the backend once, at import: set it before anything imports Keras.
    os.environ["KERAS_BACKEND"] = config.backend
    from trainer import report

    report.import_tensorflow_quietly()
    from trainer import train

    try:
        train.run(config, job_dir)
    except config_lib.UserError as e:
        config_lib.fail(str(e))
    except KeyboardInterrupt:
        config_lib.fail("interrupted; the last checkpoint in checkpoints/ is intact and the run resumes from it")


if __name__ == "__main__":
    main()
    # Every output is written, flushed and closed by now: skip the interpreter's
    # teardown of TensorFlow's objects, which takes about 2 s on every run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
