"""Other platforms' parameter names, translated into the trainer's own flags where they enter: the command line.

Huawei ModelArts starts a training program with `--data_url` and `--train_url` and passes a job's
parameters as flags of their own names (`--use_mixup=True`, `--label_balance=True`, ...). Alibaba PAI
EasyVision takes one param_config string of `--name value` pairs (`--model_type Classification
--backbone resnet_v1_50 ...`), which a PAI user passes unchanged as `--pai_param_config='...'`.
`translate` turns such a command line into the trainer's flags and says what each name became, or
why it is ignored; trainer.task prints that and runs the translated command. A name that would set a
flag the command line also gives is an error, never a silent choice. Nothing past this module knows
either platform. Keras-free; a remote data_url is listed through TensorFlow, imported then.
"""

import os
import shlex

from trainer import cli, schedules, schema
from trainer.backbones import BACKBONES, NOT_BUILT
from trainer.cli import UserError
from trainer.sagemaker import CHANNELS

# Both platforms' backbone names (ModelArts' model_name, PAI's backbone) for the networks built here.
# resnet_v1* are post-activation ResNets like ours; PAI's v1a names its 18- and 34-layer ones.
PLATFORM_BACKBONES = {
    "resnet_v1_18": "resnet-18", "resnet_v1a_18": "resnet-18", "resnet_v1_34": "resnet-34",
    "resnet_v1a_34": "resnet-34", "resnet_v1_50": "resnet-50", "resnet_v1_101": "resnet-101",
    "resnet_v1_152": "resnet-152", "resnet_v1_200": "resnet-200",
    **{f"efficientnet_b{i}": f"efficientnet-b{i}" for i in range(8)},
    # PAI's image metric learning names.
    **{f"resnet{depth}": f"resnet-{depth}" for depth in (18, 34, 50, 101)},
    **{f"{theirs}_{size}": f"{mine}-{size}" for theirs, mine in (("vit", "vit"), ("swint", "swin"))
       for size in ("tiny", "small", "base")},
}
OPTIMIZERS = {"momentum": "momentum", "sgd": "momentum", "adam": "adam", "rmsprop": "rmsprop", "adamw": "adamw"}

# ModelArts names that have no meaning here: accepted, each with the reason it is ignored.
MODELARTS_IGNORED = {
    "allow_growth": "GPU memory is the backend's to manage",
    "gpu_memory_fraction": "GPU memory is the backend's to manage",
    "session_timeout": "no TensorFlow 1 session runs here",
    "num_readers": "tf.data sets its own read parallelism",
    "num_gpus": "every visible GPU is used",
    "split_spec": "nothing is split here: validation images come from data_url's validation/ or eval/ folder, "
                  "or from --validation_data_path",
}
MODELARTS_BOOLEANS = ("use_mixup", "use_cutmix", "label_balance", "use_sync_bn", "do_eval_along_train", "allow_growth")
MODELARTS_NAMES = (
    "data_url", "train_url", "checkpoint_url", "model_name", "batch_size", "rescale_train_batch_size_factor",
    "optimizer", "momentum", "evaluate_every_n_epochs", *MODELARTS_BOOLEANS, *MODELARTS_IGNORED)
PAI_FLAG = "pai_param_config"
# PAI param_config names whose value passes unchanged to one of our flags.
PAI_SAME = {
    "num_classes": "num_classes", "num_epochs": "num_epochs", "train_data": "training_data_path",
    "test_data": "validation_data_path", "model_dir": "job-dir", "train_batch_size": "train_batch_size",
    "test_batch_size": "eval_batch_size", "image_size": "image_size", "initial_learning_rate": "initial_learning_rate",
    "decay_epochs": "decay_epochs", "decay_factor": "decay_factor", "staircase": "staircase", "power": "decay_power",
    "weight_decay": "weight_decay",
}
PAI_TASKS = {"classification": "classification", "multilabelclassification": "multi_label",
             "dataparallelmetriclearning": "metric_learning", "modelparallelmetriclearning": "metric_learning"}
PAI_DECAYS = {"exponential_decay": "exponential", "polynomial_decay": "polynomial", "cosine_decay": "cosine"}
PAI_NAMES = (*PAI_SAME, "model_type", "backbone", "lr_type", "optimizer", "momentum", "num_test_example",
             "use_pretrained_model")


def _kind(name):
    """What a name on the command line takes (cli.join_values): ours, ModelArts' and --pai_param_config."""
    if name in MODELARTS_BOOLEANS or (name in schema.BY_NAME and schema.BY_NAME[name].kind == "boolean"):
        return "boolean"
    return "value" if name in schema.BY_NAME or name in MODELARTS_NAMES or name == "flagfile" else None


def translate(argv):
    """(argv in the trainer's own flags, the lines saying what each platform name became).

    argv unchanged and no lines when it has no platform name. Raises UserError for a value or a
    combination that cannot be translated.
    """
    run = _Translation(cli.join_values(list(argv), _kind))
    if not run.modelarts and run.pai is None:
        return list(argv), []
    if run.modelarts:
        _modelarts(run)
    if run.pai is not None:
        _pai(run, _pai_parameters(run.pai))
    out = [argv[0], *(f"--{name}={value}" for name, value in run.flags.items()), *run.kept()]
    return out, run.lines + ["translated: python -m trainer.task " + shlex.join(out[1:])]


class _Translation:
    """The command line split into platform names, our flags as given, and the flags the translation sets."""

    def __init__(self, argv):
        self.modelarts, self.pai, self.given, self.tokens = {}, None, {}, []
        self.flags, self.setters, self.lines, self.taken = {}, {}, [], set()
        for arg in argv[1:]:
            name, sep, value = arg.lstrip("-").partition("=") if arg.startswith("-") else ("", "", "")
            if name in MODELARTS_NAMES:
                if name in self.modelarts:
                    raise UserError(f"ModelArts {name} is given twice")
                self.modelarts[name] = value if sep else "true"
                continue
            if name == PAI_FLAG:
                if self.pai is not None:
                    raise UserError(f"--{PAI_FLAG} is given twice")
                self.pai = value
                continue
            if name in schema.BY_NAME:
                self.given[name] = value if sep else "true"
            elif name.startswith("no") and name[2:] in schema.BY_NAME and not sep:
                self.given[name[2:]] = "false"
            self.tokens.append((name if name in schema.BY_NAME else None, arg))

    def take(self, flag):
        """The value of one of our flags the command line gives, now the translation's to set (or None)."""
        if flag in self.given:
            self.taken.add(flag)
        return self.given.get(flag)

    def has(self, flag):
        return flag in self.flags or flag in self.given

    def put(self, flag, value, source):
        """Sets one of our flags; an error when the command line or another platform name sets it too."""
        twin = "job_dir" if flag == "job-dir" and "job_dir" in self.given else None  # --job_dir is --job-dir
        if flag in self.flags or (flag in self.given and flag not in self.taken) or twin:
            other = self.setters.get(flag) or f"--{twin or flag}"
            raise UserError(f"{source} and {other} both set --{flag}; give one of them")
        self.flags[flag], self.setters[flag] = value, source

    def say(self, source, outcome):
        self.lines.append(f"{source} -> {outcome}")

    def kept(self):
        return [arg for name, arg in self.tokens if name not in self.taken]


def _isdir(path):
    if "://" not in path:
        return os.path.isdir(path)
    cli.import_tensorflow_quietly()
    import tensorflow as tf

    return tf.io.gfile.isdir(path)


def _truth(platform, name, value):
    if value.lower() in ("true", "1", "yes", "t", "y"):
        return True
    if value.lower() in ("false", "0", "no", "f", "n"):
        return False
    raise UserError(f"{platform} {name}={value!r}: expected True or False")


def _number(platform, name, value):
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{platform} {name}={value!r}: expected a number") from None


def _backbone(platform, name):
    ours = PLATFORM_BACKBONES.get(name.lower(), name if name in BACKBONES else None)
    unbuilt = next((why for family, why in NOT_BUILT.items() if name.lower().startswith(family)), None)
    if unbuilt:
        raise UserError(f"{platform} backbone {name!r}: {unbuilt}, so this trainer does not build it; choose one of "
                        + ", ".join(PLATFORM_BACKBONES))
    if ours is None:
        built = ", ".join(f"{theirs} ({mine})" for theirs, mine in PLATFORM_BACKBONES.items())
        raise UserError(f"{platform} backbone {name!r} is not one this trainer builds; it builds {built}")
    return ours


def _flags_text(run, *names):
    return " ".join(f"--{name}={run.flags[name]}" for name in names if name in run.flags)


def _modelarts(run):
    ma = run.modelarts
    if "data_url" in ma:
        _data_url(run, ma["data_url"])
    if "train_url" in ma:
        run.put("job-dir", ma["train_url"], "ModelArts train_url")
        run.say(f"ModelArts train_url={ma['train_url']}", f"--job-dir={ma['train_url']} (a rerun resumes from it)")
    if "checkpoint_url" in ma:
        run.put("pretrained_checkpoint_path", ma["checkpoint_url"], "ModelArts checkpoint_url")
        run.say(f"ModelArts checkpoint_url={ma['checkpoint_url']}", f"--pretrained_checkpoint_path={ma['checkpoint_url']} "
                "(incremental training: the head is left out when --num_classes differs)")
    if "model_name" in ma:
        run.put("model_type", _backbone("ModelArts", ma["model_name"]), "ModelArts model_name")
        run.say(f"ModelArts model_name={ma['model_name']}", _flags_text(run, "model_type"))
    _modelarts_batch(run, ma)
    for name, flag, default in (("use_mixup", "mixup_alpha", "0.2"), ("use_cutmix", "cutmix_alpha", "1.0")):
        if name in ma:
            alpha = run.take(flag)
            if _truth("ModelArts", name, ma[name]):
                run.put(flag, alpha or default, f"ModelArts {name}")
                run.say(f"ModelArts {name}={ma[name]}", _flags_text(run, flag))
            else:
                run.say(f"ModelArts {name}={ma[name]}", "off" + (f" (--{flag}={alpha} unused)" if alpha else ""))
    for name, flag, value in (("label_balance", "class_balancing", "sampler"), ("use_sync_bn", "sync_batch_norm", "true")):
        if name in ma and _truth("ModelArts", name, ma[name]):
            run.put(flag, value, f"ModelArts {name}")
            run.say(f"ModelArts {name}={ma[name]}", _flags_text(run, flag))
        elif name in ma:
            run.say(f"ModelArts {name}={ma[name]}", "off (the default)")
    _optimizer(run, "ModelArts", ma.get("optimizer"), ma.get("momentum"))
    _modelarts_strategy(run)
    _modelarts_evaluation(run, ma)
    for name, reason in MODELARTS_IGNORED.items():
        if name in ma:
            run.lines.append(f"ModelArts {name}={ma[name]}: ignored, {reason}")


def _data_url(run, url):
    """data_url with train/ and validation/ (or eval/) subfolders, or the training images alone."""
    train_sub, val_sub = (next((n for n in names if _isdir(os.path.join(url, n))), None) for _, names in CHANNELS)
    run.put("training_data_path", os.path.join(url, train_sub) if train_sub else url, "ModelArts data_url")
    if val_sub and "validation_data_path" not in run.given:
        run.put("validation_data_path", os.path.join(url, val_sub), "ModelArts data_url")
    elif not val_sub and "validation_data_path" not in run.given:
        raise UserError(f"ModelArts data_url={url} has no validation/ or eval/ subfolder, so it holds the training "
                        "images alone; name the validation images with --validation_data_path (this trainer does not "
                        "split data_url as ModelArts' split_spec does)")
    run.say(f"ModelArts data_url={url}", _flags_text(run, "training_data_path", "validation_data_path"))


def _modelarts_batch(run, ma):
    """batch_size is the training batch; rescale_train_batch_size_factor multiplies it (or ours, or the default)."""
    source = " ".join(f"{n}={ma[n]}" for n in ("batch_size", "rescale_train_batch_size_factor") if n in ma)
    if not source:
        return
    batch = ma.get("batch_size") or run.take("train_batch_size") or str(schema.BY_NAME["train_batch_size"].default)
    if not batch.isdigit():
        raise UserError(f"ModelArts {source}: the batch {batch!r} is not a whole number of images")
    size = int(batch) * _number("ModelArts", "rescale_train_batch_size_factor", ma.get("rescale_train_batch_size_factor", "1"))
    if size < 1 or size != int(size):
        raise UserError(f"ModelArts {source}: the training batch would be {size:g} images; give a factor that makes "
                        "it a whole number")
    run.put("train_batch_size", str(int(size)), f"ModelArts {source.split('=')[0]}")
    run.say(f"ModelArts {source}", _flags_text(run, "train_batch_size"))


def _optimizer(run, platform, optimizer, momentum):
    """optimizer -> --optimizer_type (sgd: momentum 0); momentum -> momentum=X in --optimizer_arguments."""
    source = " ".join(f"{n}={v}" for n, v in (("optimizer", optimizer), ("momentum", momentum)) if v is not None)
    if optimizer is not None:
        if optimizer.lower() not in OPTIMIZERS:
            raise UserError(f"{platform} optimizer={optimizer!r}: this trainer has {', '.join(OPTIMIZERS)}")
        run.put("optimizer_type", OPTIMIZERS[optimizer.lower()], f"{platform} optimizer")
        if optimizer.lower() == "sgd" and momentum is None:
            momentum = "0"
    if momentum is not None:
        given = run.take("optimizer_arguments") or ""
        if "momentum" in (pair.partition("=")[0].strip() for pair in given.split(",")):
            raise UserError(f"{platform} momentum and --optimizer_arguments both set momentum; give one of them")
        run.put("optimizer_arguments", ",".join(filter(None, [given, f"momentum={_number(platform, 'momentum', momentum):g}"])),
                f"{platform} momentum")
    if source:
        run.say(f"{platform} {source}", _flags_text(run, "optimizer_type", "optimizer_arguments"))


def _modelarts_strategy(run):
    """learning_rate_strategy: 'END:RATE,...' (epochs) needs --learning_rate_decay_type=strategy, and a run
    without its own length trains to the last END; a bare rate is a constant one."""
    strategy = run.take("learning_rate_strategy")
    if not strategy:
        return
    try:
        float(strategy)
        constant = True
    except ValueError:
        constant = False
    run.put("learning_rate_strategy", f"1:{strategy}" if constant else strategy, "ModelArts learning_rate_strategy")
    if "learning_rate_decay_type" not in run.given:
        run.put("learning_rate_decay_type", "strategy", "ModelArts learning_rate_strategy")
    ending = ""
    if not constant and not (run.has("max_steps") or run.has("num_epochs")):
        run.put("num_epochs", f"{schedules.parse_strategy(strategy)[-1].end_epoch:g}", "ModelArts learning_rate_strategy")
        ending = " (to its last END)"
    run.say(f"ModelArts learning_rate_strategy={strategy}",
            _flags_text(run, "learning_rate_decay_type", "learning_rate_strategy", "num_epochs") + ending +
            (" (a constant rate)" if constant else ""))


def _modelarts_evaluation(run, ma):
    """evaluate_every_n_epochs -> --eval_frequency=Ne; do_eval_along_train=False: one evaluation, at the end."""
    if "evaluate_every_n_epochs" in ma:
        epochs = _number("ModelArts", "evaluate_every_n_epochs", ma["evaluate_every_n_epochs"])
        run.put("eval_frequency", f"{epochs:g}e", "ModelArts evaluate_every_n_epochs")
        run.say(f"ModelArts evaluate_every_n_epochs={ma['evaluate_every_n_epochs']}", _flags_text(run, "eval_frequency"))
    if "do_eval_along_train" in ma:
        if _truth("ModelArts", "do_eval_along_train", ma["do_eval_along_train"]):
            run.say(f"ModelArts do_eval_along_train={ma['do_eval_along_train']}", "evaluations every --eval_frequency")
            return
        steps = run.flags.get("max_steps") or run.given.get("max_steps")
        epochs = run.flags.get("num_epochs") or run.given.get("num_epochs")
        run.put("eval_frequency", steps or (f"{float(epochs):g}e" if epochs else "1000000000"),
                "ModelArts do_eval_along_train")
        run.say(f"ModelArts do_eval_along_train={ma['do_eval_along_train']}",
                _flags_text(run, "eval_frequency") + " (one evaluation, at the last step)")


def _pai_parameters(text):
    """PAI's param_config: `--name value` or `--name=value` pairs over any lines, values never quoted."""
    words, out = text.split(), {}
    if not words:
        raise UserError(f"--{PAI_FLAG} is empty; give PAI's param_config string, e.g. '--model_type Classification ...'")
    i = 0
    while i < len(words):
        if not words[i].startswith("--"):
            raise UserError(f"--{PAI_FLAG}: {words[i]!r} is not a --name; PAI's parameters are written --name value")
        name, sep, value = words[i][2:].partition("=")
        if not sep:
            if i + 1 == len(words) or words[i + 1].startswith("--"):
                raise UserError(f"--{PAI_FLAG}: --{name} has no value")
            value, i = words[i + 1], i + 1
        if name not in PAI_NAMES:
            raise UserError(f"--{PAI_FLAG}: PAI parameter --{name} is not one this trainer translates; it translates "
                            + ", ".join(sorted(PAI_NAMES)))
        if name in out:
            raise UserError(f"--{PAI_FLAG}: --{name} is given twice")
        out[name] = value
        i += 1
    return out


def _pai(run, params):
    for name, value in params.items():
        source = f"PAI {name}={value}"
        if name in PAI_SAME:
            run.put(PAI_SAME[name], value, source)
            run.say(source, _flags_text(run, PAI_SAME[name]))
        elif name == "model_type":
            if value.lower() not in PAI_TASKS:
                raise UserError(f"{source}: this trainer trains Classification, MultiLabelClassification, "
                                "DataParallelMetricLearning and ModelParallelMetricLearning")
            run.put("task", PAI_TASKS[value.lower()], source)
            if value.lower() == "modelparallelmetriclearning":  # the head split over the devices: JAX's
                run.put("classifier_parallelism", "model", source)
                if "backend" not in run.given:
                    run.put("backend", "jax", source)
            run.say(source, _flags_text(run, "task", "classifier_parallelism", "backend"))
        elif name == "backbone":
            run.put("model_type", _backbone("PAI", value), source)
            run.say(source, _flags_text(run, "model_type"))
        elif name == "lr_type":
            if value.lower() not in PAI_DECAYS:
                raise UserError(f"{source}: this trainer translates {', '.join(PAI_DECAYS)}; for steps by epoch use "
                                "--learning_rate_decay_type=strategy with --learning_rate_strategy")
            run.put("learning_rate_decay_type", PAI_DECAYS[value.lower()], source)
            run.say(source, _flags_text(run, "learning_rate_decay_type"))
        elif name == "num_test_example":
            count = int(_number("PAI", name, value))
            if count > 0:
                run.put("num_eval_images", str(count), source)
            run.say(source, _flags_text(run, "num_eval_images") if count > 0 else "every validation image")
    if "optimizer" in params or "momentum" in params:
        _optimizer(run, "PAI", params.get("optimizer"), params.get("momentum"))
    if "use_pretrained_model" in params:  # after backbone, wherever the string has it
        value = params["use_pretrained_model"]
        _pai_pretrained(run, f"PAI use_pretrained_model={value}", _truth("PAI", "use_pretrained_model", value))


def _pai_pretrained(run, source, wanted):
    """PAI starts from its ImageNet weights; here only efficientnet-* has them (the `imagenet` keyword)."""
    model_type = run.flags.get("model_type") or run.given.get("model_type") or schema.BY_NAME["model_type"].default
    if not wanted:
        run.say(source, "random initial weights (the default)")
    elif model_type in BACKBONES and BACKBONES[model_type].imagenet:
        run.put("pretrained_checkpoint_path", "imagenet", source)
        run.say(source, _flags_text(run, "pretrained_checkpoint_path"))
    else:
        run.say(source, f"random initial weights: Keras has no ImageNet weights for {model_type} (--pretrained_checkpoint_path "
                "may name a weights file of an earlier run)")
