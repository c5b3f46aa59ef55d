"""SageMaker's container contract, translated into the trainer's own at the edge.

SageMaker starts a training container with the argument `train` and a folder
(/opt/ml, or $SAGEMAKER_BASE_DIR as the sagemaker-training toolkit allows):

    input/config/hyperparameters.json   {"name": "value"}, every value a string  -> --name=value
    input/config/inputdataconfig.json   each channel's input mode (File and FastFile are files; Pipe is refused)
    input/config/resourceconfig.json    the hosts; several become TF_CONFIG (chief = the first)
    input/data/train|training/          -> --training_data_path (any data form; a folder of TFRecord shards too)
    input/data/validation|eval/         -> --validation_data_path
    model/1/                            the SavedModel: $AIP_MODEL_DIR, a numbered version as TF Serving expects
    checkpoints/                        $AIP_CHECKPOINT_DIR: synced by managed spot training, so a restart resumes
    output/data/                        the job-dir: config.json, metrics.json, labels.txt, logs/
    output/failure                      the error line, written by trainer.container on any failure

The trainer's existing variables (Vertex AI's AIP_* and TF_CONFIG) carry the
layout, so nothing past this module knows about SageMaker. A hosting
container reads the model from model/ (serving_defaults). No TensorFlow here.
"""

import dataclasses
import json
import os
import shlex

from trainer.cli import UserError

DEFAULT_BASE_DIR = "/opt/ml"
MODEL_VERSION = "1"  # SageMaker's TensorFlow Serving container serves model/<version>/
SERVING_PORT = 8080  # SageMaker hosting's port, unless it names another in $SAGEMAKER_BIND_TO_PORT
WORKER_PORT = 2222  # where each host's TensorFlow collectives listen when several hosts train
CHANNELS = (("training_data_path", ("train", "training")), ("validation_data_path", ("validation", "eval")))
_OWN_FLAGS = ("job-dir", "job_dir")  # the layout decides where outputs go


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    flags: tuple  # --name=value for trainer.task, in hyperparameters.json's order, then the channels and job-dir
    environ: dict  # variables the trainer reads: AIP_MODEL_DIR, AIP_CHECKPOINT_DIR, TF_CONFIG for several hosts

    def command(self):
        """The same run as one copyable command line: what the user's hyperparameters became."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.environ.items()), "python -m trainer.task",
                         *map(shlex.quote, self.flags)])


def base_dir(environ=os.environ):
    return environ.get("SAGEMAKER_BASE_DIR") or DEFAULT_BASE_DIR


def failure_file(base):
    return os.path.join(base, "output", "failure")


def training_job(base, environ=os.environ):
    """The trainer's flags and variables for the SageMaker training job under base; UserError when it is not one."""
    config = os.path.join(base, "input", "config")
    if not os.path.isdir(config):
        raise UserError(f"train is SageMaker's training role, but {config} does not exist; set SAGEMAKER_BASE_DIR "
                        "to the job's folder, or give the trainer's flags without `train`")
    hyperparameters = _hyperparameters(os.path.join(config, "hyperparameters.json"), base)
    flags = [f"--{name}={value}" for name, value in hyperparameters.items()]
    flags += _channel_flags(os.path.join(base, "input", "data"), _read_json(os.path.join(config, "inputdataconfig.json")),
                            hyperparameters)
    flags.append(f"--job-dir={os.path.join(base, 'output', 'data')}")
    env = {"AIP_MODEL_DIR": os.path.join(base, "model", MODEL_VERSION),
           "AIP_CHECKPOINT_DIR": os.path.join(base, "checkpoints")}
    tf_config = _tf_config(_read_json(os.path.join(config, "resourceconfig.json")))
    if tf_config and not environ.get("TF_CONFIG"):
        env["TF_CONFIG"] = tf_config
    return TrainingJob(tuple(flags), env)


def _read_json(path, default=None):
    if not os.path.exists(path):
        return {} if default is None else default
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None


def _hyperparameters(path, base):
    """{flag name: value as absl reads it}; SageMaker's own entries (sagemaker_*, _tuning_objective_metric) left out."""
    given = _read_json(path)
    if not isinstance(given, dict):
        raise UserError(f"{path} must hold a JSON object of hyperparameters")
    out = {}
    for name, value in given.items():
        name = name.lstrip("-")
        if name.startswith(("sagemaker_", "_")):
            continue
        if name in _OWN_FLAGS:
            raise UserError(f"hyperparameter {name}: a SageMaker job writes where SageMaker says, model/, "
                            f"checkpoints/ and output/data/ under {base}; remove it")
        out[name] = flag_value(value)
    return out


def flag_value(value):
    """A hyperparameter as absl parses it: "32" -> 32, "False" -> False (absl: any case); SageMaker SDK
    framework estimators JSON-encode strings ('"resnet-50"'), decoded here; a JSON list -> 'a,b'."""
    if isinstance(value, str) and len(value) > 1 and value[0] == value[-1] == '"':
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(flag_value(v) for v in value)
    return str(value)


def _channel_flags(data, input_modes, hyperparameters):
    """--training_data_path / --validation_data_path from the channel folders, unless a hyperparameter names them."""
    flags = []
    for flag, names in CHANNELS:
        channel = next((name for name in names if os.path.isdir(os.path.join(data, name))), None)
        if channel is None or flag in hyperparameters:
            continue
        if input_modes.get(channel, {}).get("TrainingInputMode") == "Pipe":
            raise UserError(f"channel {channel} uses Pipe input mode; this trainer reads files: use File or FastFile")
        flags.append(f"--{flag}={os.path.join(data, channel)}")
    return flags


def _tf_config(resources):
    """TF_CONFIG for the hosts of resourceconfig.json (the first is the chief); None for one host."""
    hosts, current = resources.get("hosts", []), resources.get("current_host")
    if len(hosts) < 2:
        return None
    if current not in hosts:
        raise UserError(f"resourceconfig.json: current_host {current!r} is not one of its hosts {hosts}")
    addresses, index = [f"{host}:{WORKER_PORT}" for host in hosts], hosts.index(current)
    task = {"type": "chief", "index": 0} if index == 0 else {"type": "worker", "index": index - 1}
    return json.dumps({"cluster": {"chief": addresses[:1], "worker": addresses[1:]}, "task": task})


def serving_defaults(environ=os.environ):
    """Where SageMaker hosting puts the model (model/, its versions inside) and the port it calls."""
    port = environ.get("SAGEMAKER_BIND_TO_PORT", "")
    return {"model_dir": os.path.join(base_dir(environ), "model"), "port": int(port) if port.isdigit() else SERVING_PORT}
