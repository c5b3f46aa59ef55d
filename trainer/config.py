"""The resolved training configuration: one frozen dataclass made from the flag
table (trainer/schema.py), built from parsed values and validated once.

Each field has the name of its flag. Structured flags arrive as strings and
are parsed here ('100,200' -> (100, 200); 'momentum=0.9' -> (('momentum',
0.9),)). A value outside a flag's choices is refused from the table; the
checks below are the ones a table cannot say (ranges, and flags that depend
on each other). Nothing here imports TensorFlow or Keras, so a bad flag is
reported in a fraction of a second.
"""

import dataclasses
import math

from trainer import cli, schema
from trainer.backbones import BACKBONES, NOT_BUILT, names_in_short
from trainer.cli import UserError
from trainer.tasks import TASKS

_PYTHON_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "int_list": tuple,
                 "float_list": tuple, "pairs": tuple}


def _config_class():
    """Config: required flags first (no default), then the others with the table's defaults, parsed."""
    required = [(f.name, _PYTHON_TYPES[f.kind]) for f in schema.config_flags() if f.required]
    optional = [(f.name, _PYTHON_TYPES[f.kind], dataclasses.field(default=parse_value(f, f.default)))
                for f in schema.config_flags() if not f.required]

    def metric(self):
        """The metric that picks the best evaluation and goes to the hypertune file."""
        return self.hyperparameter_metric_tag or TASKS[self.task].metrics[0]

    def to_dict(self):
        return dataclasses.asdict(self)

    config_class = dataclasses.make_dataclass("Config", required + optional, frozen=True,
                                              namespace={"metric": property(metric), "to_dict": to_dict})
    config_class.__module__ = __name__
    return config_class


def parse_value(flag, value):
    """A flag's value as the Config holds it; structured kinds are parsed from their text."""
    if flag.kind == "int_list":
        return _parse_numbers(flag.name, value, int, "integers")
    if flag.kind == "float_list":
        return _parse_numbers(flag.name, value, float, "numbers")
    if flag.kind == "pairs":
        return parse_optimizer_arguments(value)
    return value


def _parse_numbers(flag, text, kind, what):
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return tuple(kind(item) for item in items)
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


Config = _config_class()


def from_values(values):
    """Builds and validates the Config from {flag name: value} (None: not given, so the default)."""
    kwargs = {}
    for flag in schema.config_flags():
        value = values.get(flag.name)
        if value is not None:
            kwargs[flag.name] = parse_value(flag, value)
    missing = [flag.name for flag in schema.config_flags() if flag.required and flag.name not in kwargs]
    if "max_steps" not in kwargs and not kwargs.get("num_epochs"):
        missing.append("max_steps (or --num_epochs)")
    cli.require(missing)
    config = Config(**kwargs)
    validate(config)
    return config


# Constructor arguments each optimizer_type accepts from --optimizer_arguments.
# learning_rate and weight_decay are flags of their own (the L2 loss term, or adamw's decoupled decay).
# (use_ema is left out: Keras swaps the averaged weights in only when fit ends,
# so evaluations and the best checkpoint would never see them.)
_OPTIMIZER_ARGUMENTS = {
    "momentum": ("momentum", "nesterov", "clipnorm", "clipvalue", "global_clipnorm"),
    "adam": ("beta_1", "beta_2", "epsilon", "amsgrad", "clipnorm", "clipvalue", "global_clipnorm"),
    "adamw": ("beta_1", "beta_2", "epsilon", "amsgrad", "clipnorm", "clipvalue", "global_clipnorm"),
    "rmsprop": ("rho", "momentum", "epsilon", "centered", "clipnorm", "clipvalue", "global_clipnorm"),
}
_BOOLEAN_ARGUMENTS = ("nesterov", "amsgrad", "centered")


def validate(config):
    """Raises UserError naming the first flag whose value cannot work."""
    c = config
    _check_model_type(c.model_type)
    for flag in schema.config_flags():
        if flag.choices:
            value = getattr(c, flag.name)
            _require(value in flag.choices, flag.name, f"must be one of {', '.join(flag.choices)} (got {value!r})")
    _require(c.num_classes >= 2, "num_classes", f"must be at least 2 (got {c.num_classes})")
    if (c.max_steps is None) == (not c.num_epochs):
        raise UserError("give exactly one of --max_steps and --num_epochs" if c.max_steps is not None
                        else "--max_steps or --num_epochs is required (see --help)")
    _require(c.max_steps is None or c.max_steps > 0, "max_steps", f"must be a positive number of steps (got {c.max_steps})")
    _require(c.num_epochs >= 0 and math.isfinite(c.num_epochs), "num_epochs", f"must be positive (got {c.num_epochs})")
    _require(parse_frequency(c.eval_frequency) is not None, "eval_frequency",
             f"must be a positive number of steps, or of epochs with an e suffix like '1e' (got {c.eval_frequency!r})")
    _require(c.max_training_time == "" or duration_seconds(c.max_training_time) is not None, "max_training_time",
             f"must be a duration like '90m', '2h', '45s', or a number of hours (got {c.max_training_time!r})")
    for name in ("train_batch_size", "eval_batch_size", "log_frequency", "max_to_keep"):
        _require(getattr(c, name) > 0, name, f"must be positive (got {getattr(c, name)})")
    _require(c.num_eval_images >= 0, "num_eval_images", f"must be 0 (all) or positive (got {c.num_eval_images})")
    backbone = BACKBONES[c.model_type]
    _check_image_size(c.image_size, backbone)
    if c.hyperparameter_metric_tag:
        task = TASKS[c.task]
        _require(c.hyperparameter_metric_tag in task.metrics, "hyperparameter_metric_tag",
                 f"must be one of {', '.join(task.metrics)} (got {c.hyperparameter_metric_tag!r})")
        _require(c.hyperparameter_metric_tag in task.metrics_for(c.num_classes), "hyperparameter_metric_tag",
                 f"{c.hyperparameter_metric_tag} needs more than 5 classes")
    if c.multi_label_threshold != "auto":
        try:
            ok = 0 < float(c.multi_label_threshold) < 1
        except ValueError:
            ok = False
        _require(ok, "multi_label_threshold", f"must be 'auto' or a probability in (0, 1) (got {c.multi_label_threshold!r})")
    for flag in schema.config_flags():
        if flag.kind == "float":
            value = getattr(c, flag.name)
            _require(value is None or math.isfinite(value), flag.name, f"must be a finite number (got {value})")
    for name in ("warmup_steps", "freeze_backbone_steps", "early_stopping_patience", "randaugment_magnitude",
                 "mixup_alpha", "cutmix_alpha", "early_stopping_min_delta", "ema_decay", "random_erasing",
                 "max_batch_fraction", "decay_power", "end_learning_rate"):
        _require(getattr(c, name) >= 0, name, f"must be >= 0 (got {getattr(c, name)})")
    for name in ("ema_decay", "random_erasing", "max_batch_fraction"):
        _require(getattr(c, name) < 1, name, f"must be in [0, 1) (got {getattr(c, name)})")
    _require(0 < c.randaugment_magnitude <= 1, "randaugment_magnitude", f"must be in (0, 1] (got {c.randaugment_magnitude})")
    _require(0 < c.ohem_top_ratio <= 1, "ohem_top_ratio", f"must be in (0, 1] (got {c.ohem_top_ratio})")
    _require(c.initial_learning_rate > 0, "initial_learning_rate", f"must be positive (got {c.initial_learning_rate})")
    _require(c.warmup_learning_rate >= 0, "warmup_learning_rate", f"must be >= 0 (got {c.warmup_learning_rate})")
    if c.max_steps is not None:
        _require_steps_fit(c)
    _require(0 <= c.label_smoothing < 1, "label_smoothing", f"must be in [0, 1) (got {c.label_smoothing})")
    _require(c.weight_decay >= 0, "weight_decay", f"must be >= 0 (got {c.weight_decay})")
    _require(0 <= c.random_crop_min_area <= 1, "random_crop_min_area", f"must be in (0, 1], or 0 for the task's default "
             f"(got {c.random_crop_min_area})")
    _require(0 <= c.max_corrupt_fraction <= 1, "max_corrupt_fraction", f"must be in [0, 1] (got {c.max_corrupt_fraction})")
    if c.learning_rate_decay_type == "stepwise":
        _validate_stepwise(c)
    if c.learning_rate_decay_type == "exponential":
        _require(c.decay_epochs > 0, "decay_epochs", f"must be positive (got {c.decay_epochs})")
        _require(0 < c.decay_factor <= 1, "decay_factor", f"must be in (0, 1] (got {c.decay_factor})")
    if c.learning_rate_decay_type == "strategy":
        _require(c.learning_rate_strategy, "learning_rate_strategy", "is required by --learning_rate_decay_type=strategy")
        from trainer import schedules  # Keras-free at import

        schedules.parse_strategy(c.learning_rate_strategy)  # a bad segment is named here, before TensorFlow loads
    elif c.learning_rate_strategy:
        raise UserError("--learning_rate_strategy needs --learning_rate_decay_type=strategy")
    if c.pretrained_checkpoint_path == "imagenet" and not backbone.imagenet:
        families = ", ".join(sorted({f"{b.family}-*" for b in BACKBONES.values() if b.imagenet}))
        raise UserError(f"--pretrained_checkpoint_path=imagenet: Keras provides ImageNet weights for {families} only; "
                        f"for {c.model_type} give a .weights.h5 or .keras file")
    _validate_optimizer_arguments(c)
    _validate_metric_learning(c)
    _require(c.classifier_parallelism == "data" or c.backend == "jax", "classifier_parallelism",
             "model needs the JAX backend (add --backend=jax): the head is split over the devices with "
             "keras.distribution, which TensorFlow's strategies do not offer")


# Ids above this lose precision as the float32 label a Keras loss receives.
LARGEST_LABEL_ID = 1 << 24


def _validate_metric_learning(c):
    """metric_learning's flags; on other tasks, its flags left at their defaults."""
    if c.task != "metric_learning":
        changed = [name for name in ("metric_loss", "loss_scale", "loss_margin", "loss_weight", "embedding_size")
                   if getattr(c, name) != schema.BY_NAME[name].default]
        _require(not changed, changed[0] if changed else "", f"applies to --task=metric_learning only (this run's "
                 f"--task is {c.task})")
        return
    _require(c.num_classes <= LARGEST_LABEL_ID, "num_classes", f"must be at most {LARGEST_LABEL_ID} for "
             f"metric_learning (got {c.num_classes})")
    _require(c.embedding_size > 0, "embedding_size", f"must be positive (got {c.embedding_size})")
    _require(0 < c.loss_weight <= 1, "loss_weight", f"must be in (0, 1] (got {c.loss_weight})")
    _require(c.loss_scale is None or c.loss_scale > 0, "loss_scale", f"must be positive (got {c.loss_scale})")
    _require(c.loss_margin is None or c.loss_margin >= 0, "loss_margin", f"must be >= 0 (got {c.loss_margin})")
    if c.metric_loss in ("large_margin", "sphereface") and c.loss_margin is not None:
        _require(c.loss_margin >= 1 and c.loss_margin == int(c.loss_margin), "loss_margin",
                 f"of {c.metric_loss} multiplies the angle: a whole number >= 1 (got {c.loss_margin:g})")
    for name in ("mixup_alpha", "cutmix_alpha", "label_smoothing"):
        _require(not getattr(c, name), name, "does not apply to metric_learning: a margin loss needs one hard "
                 "class per image")


def _check_model_type(model_type):
    """One line listing the backbones in short; for a network this trainer does not build, why."""
    if model_type in BACKBONES:
        return
    why = [reason for prefix, reason in NOT_BUILT.items() if model_type.lower().startswith(prefix)]
    if why:
        raise UserError(f"--model_type={model_type}: {why[0]}, so this trainer does not build it; "
                        f"choose one of {names_in_short()}")
    raise UserError(f"--model_type must be one of {names_in_short()} (got {model_type!r})")


_LARGEST_IMAGE = 1024


def _check_image_size(size, backbone):
    """The sizes the backbone can take (see backbones.py), and the nearest ones, in one line."""
    _require(16 <= size <= _LARGEST_IMAGE, "image_size", f"must be between 16 and {_LARGEST_IMAGE} pixels (got {size})")
    step, smallest = backbone.size_multiple, backbone.min_image_size
    if size >= smallest and size % step == 0:
        return
    if step == 1:
        raise UserError(f"--image_size must be at least {smallest} for {backbone.name} (got {size})")
    valid = range(-(-smallest // step) * step, _LARGEST_IMAGE + 1, step)
    rule = f"a multiple of {step}" + (f" from {valid[0]}" if valid[0] > step else "")
    nearest = [n for n in valid if n < size][-1:] + [n for n in valid if n > size][:1]
    raise UserError(f"--image_size must be {rule} for {backbone.name} (got {size}; nearest: {' or '.join(map(str, nearest))})")


def _validate_optimizer_arguments(c):
    allowed = _OPTIMIZER_ARGUMENTS[c.optimizer_type]
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


def _require_steps_fit(c):
    _require(0 <= c.warmup_steps < c.max_steps, "warmup_steps", f"must be in [0, max_steps={c.max_steps}) (got {c.warmup_steps})")
    _require(c.freeze_backbone_steps < c.max_steps, "freeze_backbone_steps",
             f"must be below max_steps={c.max_steps} (got {c.freeze_backbone_steps})")


def parse_frequency(text):
    """'1000' -> (1000, 'steps'); '0.5e' -> (0.5, 'epochs'); None when it is neither."""
    text = str(text).strip().lower()
    epochs = text.endswith("e")
    try:
        value = float(text[:-1]) if epochs else int(text)
    except ValueError:
        return None
    if not (math.isfinite(value) and value > 0):
        return None
    return value, "epochs" if epochs else "steps"


_SECONDS = {"s": 1, "m": 60, "h": 3600}


def duration_seconds(text):
    """'90m' -> 5400.0; '2h', '45s'; a bare number is hours (ModelArts' unit). None when it is none of these."""
    text = str(text).strip().lower()
    unit = _SECONDS.get(text[-1:], None)
    try:
        value = float(text[:-1] if unit else text) * (unit or 3600)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def resolve(c, training_images, batch_size):
    """The Config with what depends on the data made concrete: the training batch (the data layer may have
    lowered it), max_steps from --num_epochs, and eval_frequency as a number of steps (an int)."""
    steps_per_epoch = max(1, training_images // batch_size)
    max_steps = c.max_steps or max(1, round(c.num_epochs * steps_per_epoch))
    value, unit = parse_frequency(c.eval_frequency)
    eval_steps = max(1, round(value * steps_per_epoch)) if unit == "epochs" else int(value)
    resolved = dataclasses.replace(c, train_batch_size=batch_size, max_steps=max_steps, eval_frequency=eval_steps)
    _require_steps_fit(resolved)
    return resolved


def _require(ok, flag, message):
    if not ok:
        raise UserError(f"--{flag} {message}")
