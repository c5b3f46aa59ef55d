"""The resolved training configuration: one frozen dataclass, validated once.

Each field has the same name as its flag (task.py), its Optuna parameter and,
where it is a metric, its metrics.json key. Nothing here imports TensorFlow or
Keras, so a bad flag is reported in a fraction of a second.
"""

import dataclasses
import sys

MODEL_TYPES = (
    "resnet-18", "resnet-34", "resnet-50", "resnet-101", "resnet-152", "resnet-200",
    "efficientnet-b0", "efficientnet-b1", "efficientnet-b2", "efficientnet-b3",
    "efficientnet-b4", "efficientnet-b5", "efficientnet-b6", "efficientnet-b7",
)
DECAY_TYPES = ("cosine", "stepwise")
OPTIMIZER_TYPES = ("momentum", "adam", "rmsprop")
BACKENDS = ("tensorflow", "jax")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
TASKS = ("classification", "multi_label")
# Metrics an evaluation reports that can be tuned (all: higher is better).
TUNABLE_METRICS = {
    "classification": ("top_1_accuracy", "top_5_accuracy"),
    "multi_label": ("mAP", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "micro_precision",
                    "micro_recall", "exact_match"),
}


class UserError(Exception):
    """A mistake the user can fix; reported as one line, without a traceback."""


def fail(message):
    """Ends the program after a user mistake: one `error:` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_command_line(flag_values, argv=None):
    """Parses argv into absl flag_values; a misspelt flag, a bad value or a stray argument ends in fail()."""
    from absl import flags

    argv = list(sys.argv if argv is None else argv)
    if any(arg in ("-h", "--help", "--helpfull") for arg in argv[1:]):
        print(flag_values.get_help())
        sys.exit(0)
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        fail(str(e).replace("\n", " "))
    if len(rest) > 1:
        fail(f"unexpected argument {rest[1]!r}; flags are written --name=value")


@dataclasses.dataclass(frozen=True)
class Config:
    training_data_path: str
    validation_data_path: str
    num_classes: int
    max_steps: int
    train_batch_size: int = 32
    eval_batch_size: int = 32
    num_eval_images: int = 0  # 0 = the whole validation set
    eval_frequency: int = 1000  # steps between evaluations; one always runs at max_steps
    pretrained_checkpoint_path: str = ""
    learning_rate_decay_type: str = "cosine"
    initial_learning_rate: float = 0.0001
    warmup_learning_rate: float = 0.0
    warmup_steps: int = 0
    stepwise_learning_rate_steps: tuple = (100, 200)
    stepwise_learning_rate_levels: tuple = (0.008, 0.0008)
    optimizer_type: str = "momentum"
    optimizer_arguments: tuple = ()  # ((name, value), ...) for the optimizer's constructor
    image_size: int = 224
    model_type: str = "efficientnet-b0"
    label_smoothing: float = 0.0
    weight_decay: float = 0.0001
    random_flip: bool = True
    random_crop_min_area: float = 0.08  # fraction of the image a training crop keeps, at least
    seed: int = 42
    backend: str = "tensorflow"
    precision: str = "float32"
    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    label_offset: int = 0
    label_map_path: str = ""
    max_corrupt_fraction: float = 0.01
    log_frequency: int = 100  # steps between progress lines
    task: str = "classification"
    multi_label_threshold: str = "0.5"  # a probability, or "auto": per-class F1-best on validation
    eval_each_category: bool = False
    hyperparameter_metric_tag: str = ""  # "" = top_1_accuracy, or mAP for multi_label

    @property
    def metric(self):
        """The metric that picks the best evaluation and goes to the hypertune file."""
        return self.hyperparameter_metric_tag or TUNABLE_METRICS[self.task][0]

    @property
    def multi_label(self):
        return self.task == "multi_label"

    def to_dict(self):
        return dataclasses.asdict(self)


def parse_int_list(flag, text):
    return tuple(_parse_numbers(flag, text, int, "integers"))


def parse_float_list(flag, text):
    return tuple(_parse_numbers(flag, text, float, "numbers"))


def _parse_numbers(flag, text, kind, what):
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise UserError(f"--{flag}={text!r}: expected comma-separated {what}, like '100,200'") from None


def parse_optimizer_arguments(text):
    """'momentum=0.9,nesterov=true' -> (('momentum', 0.9), ('nesterov', True))."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--optimizer_arguments: {item!r} is not name=value; write e.g. 'momentum=0.9,nesterov=true'")
        value = _parse_scalar(raw.strip())
        # Keras optimizers want floats where a user writes momentum=0 or epsilon=1.
        pairs.append((name.strip(), float(value) if isinstance(value, int) and not isinstance(value, bool) else value))
    return tuple(pairs)


def _parse_scalar(raw):
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


# Constructor arguments each optimizer_type accepts from --optimizer_arguments.
# learning_rate is a flag of its own; weight_decay is the L2 loss term.
# (use_ema is left out: Keras swaps the averaged weights in only when fit ends,
# so evaluations and the best checkpoint would never see them.)
_OPTIMIZER_ARGUMENTS = {
    "momentum": ("momentum", "nesterov", "clipnorm", "clipvalue", "global_clipnorm"),
    "adam": ("beta_1", "beta_2", "epsilon", "amsgrad", "clipnorm", "clipvalue", "global_clipnorm"),
    "rmsprop": ("rho", "momentum", "epsilon", "centered", "clipnorm", "clipvalue", "global_clipnorm"),
}
_BOOLEAN_ARGUMENTS = ("nesterov", "amsgrad", "centered")


def optimizer_argument_names(optimizer_type):
    return _OPTIMIZER_ARGUMENTS[optimizer_type]


def validate(config):
    """Raises UserError naming the first flag whose value cannot work."""
    c = config
    _require(c.training_data_path, "training_data_path", "is required: a TFRecord glob, a folder per class, or an image-list .txt file")
    _require(c.validation_data_path, "validation_data_path", "is required: a TFRecord glob, a folder per class, or an image-list .txt file")
    _require(c.num_classes >= 2, "num_classes", f"must be at least 2 (got {c.num_classes})")
    _require(c.max_steps > 0, "max_steps", f"is required and must be a positive number of steps (got {c.max_steps})")
    for name in ("train_batch_size", "eval_batch_size", "eval_frequency", "log_frequency"):
        _require(getattr(c, name) > 0, name, f"must be positive (got {getattr(c, name)})")
    _require(c.num_eval_images >= 0, "num_eval_images", f"must be 0 (all) or positive (got {c.num_eval_images})")
    _require(16 <= c.image_size <= 1024, "image_size", f"must be between 16 and 1024 pixels (got {c.image_size})")
    _one_of(c, "model_type", MODEL_TYPES)
    _one_of(c, "learning_rate_decay_type", DECAY_TYPES)
    _one_of(c, "optimizer_type", OPTIMIZER_TYPES)
    _one_of(c, "backend", BACKENDS)
    _one_of(c, "precision", PRECISIONS)
    _one_of(c, "task", TASKS)
    if c.hyperparameter_metric_tag:
        _one_of(c, "hyperparameter_metric_tag", TUNABLE_METRICS[c.task])
        _require(c.hyperparameter_metric_tag != "top_5_accuracy" or c.num_classes > 5, "hyperparameter_metric_tag",
                 "top_5_accuracy needs more than 5 classes")
    if c.multi_label_threshold != "auto":
        try:
            ok = 0 < float(c.multi_label_threshold) < 1
        except ValueError:
            ok = False
        _require(ok, "multi_label_threshold", f"must be 'auto' or a probability in (0, 1) (got {c.multi_label_threshold!r})")
    _require(c.initial_learning_rate > 0, "initial_learning_rate", f"must be positive (got {c.initial_learning_rate})")
    _require(c.warmup_learning_rate >= 0, "warmup_learning_rate", f"must be >= 0 (got {c.warmup_learning_rate})")
    _require(0 <= c.warmup_steps < c.max_steps, "warmup_steps", f"must be in [0, max_steps={c.max_steps}) (got {c.warmup_steps})")
    _require(0 <= c.label_smoothing < 1, "label_smoothing", f"must be in [0, 1) (got {c.label_smoothing})")
    _require(c.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {c.weight_decay})")
    _require(0 < c.random_crop_min_area <= 1, "random_crop_min_area", f"must be in (0, 1] (got {c.random_crop_min_area})")
    _require(0 <= c.max_corrupt_fraction <= 1, "max_corrupt_fraction", f"must be in [0, 1] (got {c.max_corrupt_fraction})")
    if c.learning_rate_decay_type == "stepwise":
        _validate_stepwise(c)
    _require(c.pretrained_checkpoint_path != "imagenet" or c.model_type.startswith("efficientnet"),
             "pretrained_checkpoint_path", "=imagenet: Keras provides ImageNet weights for efficientnet-* only; "
             f"for {c.model_type} give a .weights.h5 or .keras file")
    _require(c.image_size >= 32 or not c.model_type.startswith("efficientnet"), "image_size",
             f"must be at least 32 for {c.model_type} (got {c.image_size})")
    allowed = optimizer_argument_names(c.optimizer_type)
    for name, value in c.optimizer_arguments:
        _require(name in allowed, "optimizer_arguments",
                 f"{name!r} is not an argument of the {c.optimizer_type} optimizer; valid: {', '.join(allowed)}")
        boolean = name in _BOOLEAN_ARGUMENTS
        ok = isinstance(value, bool) if boolean else isinstance(value, float) and value >= 0
        _require(ok, "optimizer_arguments", f"{name}={value!r} should be {'true or false' if boolean else 'a number >= 0'}")
        _require(name not in ("momentum", "rho", "beta_1", "beta_2") or value < 1, "optimizer_arguments",
                 f"{name} must be below 1 (got {value})")
    _require(len({n for n, _ in c.optimizer_arguments} & {"clipnorm", "clipvalue", "global_clipnorm"}) <= 1,
             "optimizer_arguments", "give at most one of clipnorm, clipvalue, global_clipnorm")


def _validate_stepwise(c):
    steps, levels = c.stepwise_learning_rate_steps, c.stepwise_learning_rate_levels
    _require(steps, "stepwise_learning_rate_steps", "needs at least one step boundary for stepwise decay")
    _require(len(steps) == len(levels), "stepwise_learning_rate_levels",
             f"needs one level per step boundary ({len(steps)} steps, {len(levels)} levels)")
    _require(list(steps) == sorted(set(steps)) and steps[0] > 0, "stepwise_learning_rate_steps",
             f"must be positive and strictly increasing (got {','.join(map(str, steps))})")
    _require(all(level > 0 for level in levels), "stepwise_learning_rate_levels", "must all be positive")


def _require(ok, flag, message):
    if not ok:
        raise UserError(f"--{flag} {message}")


def _one_of(config, flag, allowed):
    value = getattr(config, flag)
    _require(value in allowed, flag, f"must be one of {', '.join(allowed)} (got {value!r})")

